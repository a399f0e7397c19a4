"""The hooks a graphopt plugin can implement (pluggy hook specifications), by pipeline phase.

A plugin is any module or object with functions decorated by :data:`graphopt.hookimpl`; it is found
through the ``graphopt`` entry-point group or registered with :func:`graphopt.register_plugin`. What a
*method* contributes is not a hook: it is recorded through its context (see :mod:`graphopt.context`).

| phase | hook | answer |
|---|---|---|
| registry | ``graphopt_register_methods(register)`` | call ``register(MethodClass)`` |
| capture | ``graphopt_capture(model, example_inputs)`` | a GraphModule or None (the first answer wins) |
| apply | ``graphopt_before_apply(method, graph_module, ctx)`` | observe |
| apply | ``graphopt_after_apply(method, graph_module, ctx)`` | observe |
| step | ``graphopt_step_end(model, step, loss)`` | observe (logging, early stopping) |
| bench | ``graphopt_bench_cases(register)`` | call ``register(name, fn, quick=True)`` |
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from graphopt.context import MethodContext
    from graphopt.method import Method

hookspec = pluggy.HookspecMarker("graphopt")
hookimpl = pluggy.HookimplMarker("graphopt")


# -- registry ------------------------------------------------------------------------------------------
@hookspec
def graphopt_register_methods(register: Callable[[type[Method]], None]) -> None:
    """Register method classes: call ``register(MethodClass)`` once per method.

    A name registered by two plugins is an error naming both.
    """


# -- capture -------------------------------------------------------------------------------------------
@hookspec(firstresult=True)
def graphopt_capture(model: torch.nn.Module, example_inputs: tuple[Any, ...]) -> torch.fx.GraphModule | None:
    """Capture ``model`` (graphopt's private copy) into a GraphModule, or return None to leave it to the next
    capturer. The first non-None answer wins; graphopt's own capture (torch.export, then symbolic_trace)
    runs when every plugin returns None.
    """


# -- apply ---------------------------------------------------------------------------------------------
@hookspec
def graphopt_before_apply(method: Method, graph_module: torch.fx.GraphModule, ctx: MethodContext) -> None:
    """Called before ``method.apply`` runs on the forward graph ``graph_module`` (observe, don't change)."""


@hookspec
def graphopt_after_apply(method: Method, graph_module: torch.fx.GraphModule, ctx: MethodContext) -> None:
    """Called after ``method.apply`` changed ``graph_module`` and the graph passed its checks."""


# -- step ----------------------------------------------------------------------------------------------
@hookspec
def graphopt_step_end(model: Any, step: int, loss: torch.Tensor) -> None:
    """Called after each training step of a compiled model, with the 1-based step number and the loss."""


# -- bench ---------------------------------------------------------------------------------------------
@hookspec
def graphopt_bench_cases(register: Callable[..., None]) -> None:
    """Contribute benchmark cases to ``graphopt bench``: ``register(name, fn, quick=True)``.

    ``fn(quick: bool) -> dict`` runs its variants side by side and returns JSON-able results.
    """
