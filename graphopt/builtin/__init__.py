"""graphopt's built-in methods, one module each.

Each module is registered through the ``graphopt`` entry-point group in graphopt's pyproject, the same
way a third-party plugin is.
"""
