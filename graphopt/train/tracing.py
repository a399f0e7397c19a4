"""Tracing the step function into one aten graph whose input dims stay dynamic, and compiling it.

``trace_step`` runs ``make_fx`` on fake tensors that share one ``ShapeEnv``: parameters, buffers and state
have static shapes, and each dynamic dim of the inputs (``graphopt.inputs``) — and the dims of the target
of the same size, the batch of the labels — is a symbol. The graph then runs on every size of those dims.
A dim the traced code specialises (it branches on its value) is reported, and the step treats it as
static from then on. ``compile_graph`` hands the graph to ``torch.compile`` with those dims marked dynamic,
so inductor too compiles once for every batch size (a batch of one is specialised by the compiler and
compiles once more; both compiles are logged with their time).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
from torch.fx.traceback import preserve_node_meta
from torch.utils import _pytree as pytree

from graphopt.inputs import CallInputs, Dims, Key
from graphopt.progress import logger, stage


@dataclass(frozen=True)
class Trace:
    """A traced step graph and the dynamic dims its code specialised (``(input key, dim)``; target: ``"target"``)."""

    graph: torch.fx.GraphModule
    specialised: frozenset[tuple[Key, int]]


def target_dims(target: Any, inputs: CallInputs, dims: Dims) -> tuple[int, ...]:
    """The dims of a tensor ``target`` whose size is that of a dynamic input dim (the labels' batch, the LM
    targets' batch and sequence)."""
    if not isinstance(target, torch.Tensor):
        return ()
    sizes = {value.shape[d] for key, value in inputs.items() if key in dims for d in dims[key]}
    return tuple(d for d, n in enumerate(target.shape) if n in sizes)


def trace_step(step_fn: Callable[..., Any], static: tuple[Any, ...], inputs: CallInputs, dims: Dims,
               target: Any) -> Trace:
    """``make_fx`` of ``step_fn(*static, args, kwargs, target)`` with the dims described above symbolic."""
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=False)

    def fake(value: Any, dynamic: tuple[int, ...] = ()) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        sizes = [DimDynamic.DYNAMIC if d in dynamic else DimDynamic.STATIC for d in range(value.dim())]
        return mode.from_tensor(value, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))

    fakes = inputs.map(lambda key, value: fake(value, dims.get(key, ())))
    target_dynamic = target_dims(target, inputs, dims)
    fake_target = fake(target, target_dynamic)
    with preserve_node_meta():
        graph = make_fx(step_fn, tracing_mode="symbolic")(*pytree.tree_map(fake, static), fakes.args, fakes.kwargs,
                                                          fake_target)
    _views_as_reshapes(graph)
    symbolic = [(key, d, value.shape[d]) for key, value in fakes.items() for d in dims.get(key, ())]
    symbolic += [("target", d, fake_target.shape[d]) for d in target_dynamic]
    specialised = frozenset((key, d) for key, d, size in symbolic if _is_constant(size))
    for key, d in sorted(specialised, key=str):
        logger.info("training step: dim %d of input %r is specialised by the step's code (it depends on its "
                    "value); each size traces its own graph", d, key)
    return Trace(graph, specialised)


def _views_as_reshapes(graph: torch.fx.GraphModule) -> None:
    """Every ``aten.view`` of the traced step as ``aten.reshape``: the same tensor (a view) whenever one exists.
    Fake tensors propagate the strides of elementwise ops on permuted inputs differently from the CPU kernels
    (ConvNeXt's channels-last MLP with oftv2), so a view the trace allowed can be impossible at run time."""
    for node in graph.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default
    graph.recompile()


def _is_constant(size: Any) -> bool:
    if isinstance(size, int):
        return True
    node = size.node
    return bool(node.shape_env.replace(node.expr).is_number)


def compile_graph(graph: torch.fx.GraphModule, backend: str, what: str, on_compile: Callable[[], None] | None = None,
                  inductor_config: dict[str, Any] | None = None) -> Callable[..., Any]:
    """``graph`` itself for ``backend="eager"``, else ``torch.compile`` of it with a backend that logs each
    compile (and says why when it compiles again) and calls ``on_compile``; ``inductor_config``: settings of
    ``torch._inductor.config`` while it compiles."""
    if backend == "eager":
        return graph
    compiles = 0

    def compile_with_log(fx_graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        nonlocal compiles
        compiles += 1
        if on_compile is not None:
            on_compile()
        again = "" if compiles == 1 else " again, for input shapes the first compile specialised (size-1 dims)"
        from torch._inductor import config as inductor

        with stage(f"{what}: {backend} compile{again}", announce=True), inductor.patch(inductor_config or {}):
            return torch._dynamo.lookup_backend(backend)(fx_graph, example_inputs)

    return torch.compile(graph, backend=compile_with_log, fullgraph=True, dynamic=None)


def mark_dynamic(inputs: CallInputs, dims: Dims, target: Any = None, target_dynamic: tuple[int, ...] = ()) -> None:
    """Tell ``torch.compile`` which dims of this call's tensors are dynamic (before it compiles them static)."""
    for key, value in inputs.items():
        for d in dims.get(key, ()):
            torch._dynamo.maybe_mark_dynamic(value, d)
    for d in target_dynamic:
        torch._dynamo.maybe_mark_dynamic(target, d)
