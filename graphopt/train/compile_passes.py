"""Inductor graph passes that graphopt adds when it compiles a training step (``graphopt.train.tracing``).

``UnfuseCopiedAddmm``: inductor rewrites ``C + A @ B`` into ``addmm(C, A, B)``. On the CPU, ``addmm`` into a
fresh buffer first copies ``C`` into it and then runs the GEMM with ``β = 1``, which reads and writes the
buffer again: for an optimizer's momentum ``B ← μB + G`` with ``G = Xᵀ·dY`` a weight gradient, that is a
kernel for ``μB``, a copy of it and the GEMM's read-modify-write of the copy (five passes over a
parameter-sized tensor) where an ``mm`` and one fused pointwise kernel (``G`` written once, read once by the
update, which writes the buffer and the parameter) need three. The pass turns such an ``addmm`` back into
``mm`` plus the pointwise add when ``C`` is a full-size tensor computed in the graph (not a broadcast bias)
and every user of the result is pointwise, so inductor fuses the add into its users; inductor makes the same
choice itself on GPUs (``should_prefer_unfused_addmm``).

``HoistUpdates``: a scheduler pass (after fusion, before inductor's own peak-memory ordering, which keeps this
order unless it estimates a lower peak) that moves every kernel that writes into a graph input (a parameter's
update and its optimizer state, as :mod:`graphopt.train.schedule` places it in the FX graph) to just after the
last kernel it depends on (its data and the readers of the storage it overwrites). Without it inductor issues
the update of layer ``k`` after the weight-gradient GEMM of layer ``k − 1`` (it runs the update in the kernel
that follows, where the next bias gradient is reduced), so two weight gradients are alive at once (measured
on 4×Linear(1024) with sgd: 41.3 MiB peak against optimizer-in-backward's 37.5).
"""

from __future__ import annotations

from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, CustomSchedulerPass, get_hash_for_files

aten = torch.ops.aten
# users that read the addmm's result element by element without being tagged pointwise: the write-back of a
# mutated input and the copies of functionalization
ELEMENTWISE_USERS = (aten.copy_.default, aten.copy.default)


class UnfuseCopiedAddmm(CustomGraphPass):
    """See the module docstring."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in list(graph.nodes):
            if _copies_a_computed_operand(node):
                _unfuse(graph, node)

    def uuid(self) -> Any:
        return get_hash_for_files((__file__,))


class HoistUpdates(CustomSchedulerPass):
    """See the module docstring."""

    def __call__(self, nodes: list[Any]) -> list[Any]:
        from torch._inductor.virtualized import V

        inputs = set(V.graph.graph_inputs)
        order: list[Any] = []
        for node in nodes:
            if _writes_into(node, inputs):
                after = max((i for i, other in enumerate(order)
                             if other.get_operation_names() & node.ancestors), default=-1)
                order.insert(after + 1, node)
            else:
                order.append(node)
        return order

    def uuid(self) -> Any:
        return get_hash_for_files((__file__,))


def _writes_into(node: Any, inputs: set[str]) -> bool:
    """Whether scheduler node ``node`` writes in place into a graph input (a parameter, an optimizer slot)."""
    return any(set(buffer.get_mutations()) & inputs for buffer in node.get_outputs())


def _copies_a_computed_operand(node: torch.fx.Node) -> bool:
    if node.op != "call_function" or node.target is not aten.addmm.default:
        return False
    operand, result = node.args[0], node.meta.get("val")
    if not isinstance(operand, torch.fx.Node) or operand.op != "call_function" or result is None:
        return False
    value = operand.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.device.type != "cpu" or value.shape != result.shape:
        return False
    return bool(node.users) and all(_elementwise(user) for user in node.users)


def _elementwise(user: torch.fx.Node) -> bool:
    return user.op == "call_function" and (user.target in ELEMENTWISE_USERS or (
        isinstance(user.target, torch._ops.OpOverload) and torch.Tag.pointwise in user.target.tags))


def _unfuse(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """``addmm(C, A, B, beta=β, alpha=α)`` → ``β·C + α·(A @ B)`` as ``mm`` and pointwise ops."""
    operand, left, right = node.args[:3]
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    with graph.inserting_before(node):
        product = _node_like(graph, aten.mm.default, (left, right), node)
        if alpha != 1:
            product = _node_like(graph, aten.mul.Tensor, (product, alpha), node)
        if beta != 1:
            operand = _node_like(graph, aten.mul.Tensor, (operand, beta), node)
        total = _node_like(graph, aten.add.Tensor, (operand, product), node)
    node.replace_all_uses_with(total)
    graph.erase_node(node)


def _node_like(graph: torch.fx.Graph, target: Any, args: tuple[Any, ...], like: torch.fx.Node) -> torch.fx.Node:
    """A new node with ``like``'s meta: every node of the rewrite has the addmm's shape, dtype and strides."""
    new = graph.call_function(target, args)
    new.meta.update(like.meta)
    return new
