"""Interop with PEFT and plain models: PEFT checkpoints both ways (:mod:`graphopt.interop.peft`), merged plain
modules of the user's class (:mod:`graphopt.interop.merge`), adapter-only state (:mod:`graphopt.interop.adapter_state`).
"""

from graphopt.interop.peft import from_peft

__all__ = ["from_peft"]
