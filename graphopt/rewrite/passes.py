"""The pass manager: applies each method to the captured forward graph and checks what it left.

Order: every ``"forward"``-stage method in the order the user listed them; then, if any of them added a
trainable parameter, every other parameter is frozen; then every ``"training"``-stage method (they see the
final forward graph and which parameters train). Each ``apply`` runs through the dispatcher, between the
``graphopt_before_apply`` / ``graphopt_after_apply`` hooks; after it the graph is linted and run on the
example inputs, and its output must keep the structure, shapes and dtypes it had. A failure names the
method, its plugin and the phase. Methods work on graphopt's private copy of the model.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils import _pytree as pytree

from graphopt.captured import CapturedModel
from graphopt.context import MethodContext
from graphopt.dispatch import APPLY, dispatch, method_error
from graphopt.errors import OptionError
from graphopt.method import Method
from graphopt.plugins import call_hook


def output_signature(output: Any) -> Any:
    """Tree structure plus shape/dtype of each tensor leaf, to compare outputs before and after."""
    leaves, spec = pytree.tree_flatten(output)
    return spec, [(tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x) for x in leaves]


@contextlib.contextmanager
def no_side_effects(gm: torch.fx.GraphModule) -> Iterator[None]:
    """Run check passes without leaving a trace: buffers (batch-norm statistics) and the RNG are restored."""
    saved = {name: buffer.clone() for name, buffer in gm.named_buffers()}
    with torch.random.fork_rng(), torch.no_grad():
        try:
            yield
        finally:
            for name, buffer in gm.named_buffers():
                if name in saved:
                    buffer.copy_(saved[name])


def check_graph(ctx: MethodContext, gm: torch.fx.GraphModule, expected: Any) -> None:
    """Lint ``gm`` and run it on the example inputs; its output must match the ``expected`` signature."""
    try:
        gm.graph.lint()
        gm.recompile()
    except Exception as err:
        raise method_error(ctx, APPLY, f"produced an invalid graph: {type(err).__name__}: {err}") from err
    try:
        with no_side_effects(gm):
            output = gm(*ctx.example_inputs.args, **ctx.example_inputs.kwargs)
    except Exception as err:
        raise method_error(ctx, APPLY, f"produced a graph that does not run: {type(err).__name__}: {err}") from err
    if output_signature(output) != expected:
        raise method_error(ctx, APPLY, f"changed the model's output from {expected[1]} to "
                                       f"{output_signature(output)[1]}")


def apply_methods(captured: CapturedModel, methods: list[Method], trainable: tuple[str, ...] = ()) -> None:
    """Apply ``methods`` to ``captured.gm`` in stage order (see the module docstring), recording their
    contexts and contributions on ``captured``. ``trainable``: module or parameter globs that stay trainable
    when the base weights are frozen (PEFT's ``modules_to_save``)."""
    gm = captured.gm
    with no_side_effects(gm):
        expected = output_signature(gm(*captured.example.args, **captured.example.kwargs))
    for method in methods:
        if method.stage == "forward":
            _apply(captured, method, expected)
    keep = kept_trainable(gm, trainable)
    if captured.contributions.parameters:
        for name, param in gm.named_parameters():
            if name not in captured.contributions.parameters and name not in keep:
                param.requires_grad_(False)
    for method in methods:
        if method.stage == "training":
            _apply(captured, method, expected)


def kept_trainable(gm: torch.fx.GraphModule, globs: tuple[str, ...]) -> set[str]:
    """The parameters ``globs`` name, directly or through a module (or ancestor) path; a glob that names
    nothing is an ``OptionError`` listing the modules."""
    names = [n for n, _ in gm.named_parameters()]
    kept: set[str] = set()
    for glob in globs:
        matched = {n for n in names if fnmatch.fnmatchcase(n, glob) or any(
            fnmatch.fnmatchcase(".".join(n.split(".")[:i]), glob) for i in range(1, n.count(".") + 1))}
        if not matched:
            modules = sorted({n.rpartition(".")[0] for n in names} - {""})
            raise OptionError(f"trainable={glob!r} matches no parameter or module; modules: "
                              f"{', '.join(modules[:20])}{', ...' if len(modules) > 20 else ''}")
        kept |= matched
    return kept


def _apply(captured: CapturedModel, method: Method, expected: Any) -> None:
    gm = captured.gm
    ctx = MethodContext(method, captured)
    captured.contexts.append(ctx)
    call_hook("graphopt_before_apply", f" before method {method.name!r} applied", method=method, graph_module=gm,
              ctx=ctx)
    result = dispatch(ctx, APPLY, "apply", method.apply, gm, ctx)
    if result is not None and result is not gm:
        raise method_error(ctx, APPLY, "must rewrite the forward graph in place: apply(gm, ctx) changes gm and "
                                       f"returns None (it returned {type(result).__name__})")
    check_graph(ctx, gm, expected)
    call_hook("graphopt_after_apply", f" after method {method.name!r} applied", method=method, graph_module=gm,
              ctx=ctx)
