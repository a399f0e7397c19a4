"""graphopt-peft-extras: an example third-party graphopt plugin with two adapter methods.

- ``ia3`` (:mod:`.ia3`): a learned rescaling of a layer's input features, an *input transform*;
- ``vera`` (:mod:`.vera`): a LoRA-style branch with frozen random factors, an *output delta*.

One ``graphopt_register_methods`` hook registers both; ``pyproject.toml`` declares this module under the
``graphopt`` entry-point group, which is all graphopt needs to find them.
"""

from __future__ import annotations

import graphopt

from .ia3 import IA3
from .vera import VeRA


@graphopt.hookimpl
def graphopt_register_methods(register):
    register(IA3)
    register(VeRA)
