"""Graph surgery shared by adapter methods: a transform of a layer's input, or a delta added to its
output, as one ``call_function`` node; and folding that node into the layer's weight at export.

An *input transform* ``x ← fn(x, *params)`` (HRA, OFTv2) acts on the last dim of the layer input; a
linear layer ``y = x Wᵀ + b`` then computes ``y = fn(x) Wᵀ + b``, and folding replaces ``W`` by
``fold_weight(W, *params)`` (``W`` always in ``(out, in)`` layout; ``addmm`` weights stored ``(in, out)``
are transposed for you). An *output delta* ``y ← y + fn(x, *params)`` (LoRA-style branches) folds to
``W + fold_delta(*params)``. A *weight transform* ``W ← fn(W, *params)`` (HRA and OFTv2 on Conv2d, where
the input-centric form would need the unfolded patches) makes the layer read ``fn``'s result as its
weight; folding evaluates it once. The node's target is the plain Python function, so the graph reads
``hra_transform(x, fc1_hra_u)``, and make_fx / torch.export trace through it into aten ops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from graphopt.errors import ExportError
from graphopt.rewrite.layers import LayerCall
from graphopt.rewrite.meta import set_layer_path

if TYPE_CHECKING:
    from graphopt.context import MethodContext

aten = torch.ops.aten
_INPUT_INDEX = {"linear": 0, "conv2d": 0, "addmm": 1}
_WEIGHT_INDEX = {"linear": 1, "conv2d": 1, "addmm": 2}


def _copy_layer_meta(node: torch.fx.Node, layer: LayerCall) -> None:
    node.meta.update({k: v for k, v in layer.node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    set_layer_path(node, layer.path)


def insert_input_transform(ctx: MethodContext, layer: LayerCall, fn: Callable[..., Any],
                           param_names: Sequence[str], **kwargs: Any) -> torch.fx.Node:
    """Insert ``fn(x, *params, **kwargs)`` before ``layer`` and make the layer read its result."""
    graph = ctx.graph_module.graph
    index = _INPUT_INDEX[layer.kind]
    source = layer.node.args[index]
    params = [ctx.get_attr(name, layer.node) for name in param_names]
    with graph.inserting_before(layer.node):
        node = graph.call_function(fn, (source, *params), kwargs)
    _copy_layer_meta(node, layer)
    layer.node.update_arg(index, node)
    return node


def insert_weight_transform(ctx: MethodContext, layer: LayerCall, fn: Callable[..., Any],
                            param_names: Sequence[str], **kwargs: Any) -> torch.fx.Node:
    """Insert ``fn(W, *params, **kwargs)`` before ``layer`` and make the layer read its result as its weight."""
    graph = ctx.graph_module.graph
    index = _WEIGHT_INDEX[layer.kind]
    params = [ctx.get_attr(name, layer.node) for name in param_names]
    with graph.inserting_before(layer.node):
        node = graph.call_function(fn, (layer.weight, *params), kwargs)
    _copy_layer_meta(node, layer)
    layer.node.update_arg(index, node)
    return node


def insert_output_delta(ctx: MethodContext, layer: LayerCall, fn: Callable[..., Any],
                        param_names: Sequence[str], dropout: float = 0.0, **kwargs: Any) -> torch.fx.Node:
    """Replace the layer's output ``y`` by ``y + fn(x, *params, **kwargs)``; returns the ``fn`` node.

    ``dropout > 0``: the branch reads ``aten.dropout(x, dropout, train=True)`` instead of ``x`` (the layer
    itself reads ``x``); the inference graph turns it off like every dropout of the model.
    """
    graph = ctx.graph_module.graph
    source = layer.node.args[_INPUT_INDEX[layer.kind]]
    if dropout:
        with graph.inserting_before(layer.node):
            source = graph.call_function(aten.dropout.default, (source, float(dropout), True))
        _copy_layer_meta(source, layer)
    params = [ctx.get_attr(name, layer.node) for name in param_names]
    with graph.inserting_after(layer.node):
        delta = graph.call_function(fn, (source, *params), kwargs)
    with graph.inserting_after(delta):
        total = graph.call_function(aten.add.Tensor, (layer.node, delta))
    layer.node.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)
    for node in (delta, total):
        _copy_layer_meta(node, layer)
    return delta


def remove_output_delta(gm: torch.fx.GraphModule, delta: torch.fx.Node) -> list[str]:
    """Undo :func:`insert_output_delta` for the ``fn`` node ``delta``: the layer's output is used as is again.
    Returns the names of the parameters the branch read (their ``get_attr`` nodes are erased if unused)."""
    (total,) = delta.users
    layer_node = next(a for a in total.args if a is not delta)
    total.replace_all_uses_with(layer_node)
    gm.graph.erase_node(total)
    param_nodes = [a for a in delta.args[1:] if isinstance(a, torch.fx.Node) and a.op == "get_attr"]
    source = delta.args[0]
    gm.graph.erase_node(delta)
    for node in param_nodes:
        if not node.users:
            gm.graph.erase_node(node)
    if isinstance(source, torch.fx.Node) and source.target is aten.dropout.default and not source.users:
        gm.graph.erase_node(source)  # the branch's own dropout (impure: dead-code elimination keeps it)
    return [node.target for node in param_nodes]


def _attr(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor:
    owner, _, name = node.target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _refuse_tied(gm: torch.fx.GraphModule, target: str, readers: set[torch.fx.Node]) -> None:
    """Folding changes the tensor ``target`` for every node that reads it: only ``readers`` may."""
    others = [u.name for n in gm.graph.nodes if n.op == "get_attr" and n.target == target
              for u in n.users if u not in readers]
    if others:
        raise ExportError(f"cannot fold the adapter into {target}: the tensor is also read by {', '.join(others)} "
                          "(tied weights, e.g. an LM head and its embedding); exclude the layer from targets or "
                          "export with merge=False")


def _set_weight(gm: torch.fx.GraphModule, layer_node: torch.fx.Node, kind: str, weight_out_in: torch.Tensor) -> None:
    weight_node = layer_node.args[2] if kind == "addmm" else layer_node.args[1]
    _refuse_tied(gm, weight_node.target, {layer_node})
    owner, _, name = weight_node.target.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    old = getattr(module, name)
    value = weight_out_in.t() if kind == "addmm" else weight_out_in
    setattr(module, name, torch.nn.Parameter(value.detach().to(old.dtype).contiguous(), requires_grad=False))


def _layer_kind(node: torch.fx.Node) -> str:
    return {aten.linear.default: "linear", aten.addmm.default: "addmm", aten.conv2d.default: "conv2d"}[node.target]


def _weight_out_in(gm: torch.fx.GraphModule, layer_node: torch.fx.Node, kind: str) -> torch.Tensor:
    weight = _attr(gm, layer_node.args[2] if kind == "addmm" else layer_node.args[1]).detach()
    return weight.t() if kind == "addmm" else weight


def fold_input_transforms(gm: torch.fx.GraphModule, fn: Callable[..., Any],
                          fold_weight: Callable[..., torch.Tensor]) -> int:
    """Fold every ``fn`` input-transform node: ``W ← fold_weight(W, *params, **kwargs)``; returns the count."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not fn:
            continue
        params = [_attr(gm, p).detach() for p in node.args[1:]]
        for user in list(node.users):
            kind = _layer_kind(user)
            with torch.no_grad():
                _set_weight(gm, user, kind, fold_weight(_weight_out_in(gm, user, kind), *params, **node.kwargs))
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        count += 1
    gm.recompile()
    return count


def fold_weight_transforms(gm: torch.fx.GraphModule, fn: Callable[..., Any],
                           fold_weight: Callable[..., torch.Tensor] | None = None) -> int:
    """Fold every ``fn`` weight-transform node: ``W ← fold_weight(W, *params, **kwargs)`` (default ``fn``
    itself, in the weight's own layout); the layer reads ``W`` again. Returns the count."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not fn:
            continue
        weight_node = node.args[0]
        _refuse_tied(gm, weight_node.target, {node})
        params = [_attr(gm, p).detach() for p in node.args[1:]]
        owner, _, name = weight_node.target.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        old = getattr(module, name)
        with torch.no_grad():
            value = (fold_weight or fn)(old.detach(), *params, **node.kwargs)
        setattr(module, name, torch.nn.Parameter(value.to(old.dtype).contiguous(), requires_grad=False))
        node.replace_all_uses_with(weight_node)
        gm.graph.erase_node(node)
        count += 1
    gm.recompile()
    return count


def fold_output_deltas(gm: torch.fx.GraphModule, fn: Callable[..., Any],
                       fold_delta: Callable[..., torch.Tensor]) -> int:
    """Fold every ``y + fn(x, *params)`` branch: ``W ← W + fold_delta(*params, **kwargs)``; returns the count."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not fn:
            continue
        (total,) = node.users
        layer_node = next(a for a in total.args if a is not node)
        kind = _layer_kind(layer_node)
        params = [_attr(gm, p).detach() for p in node.args[1:]]
        with torch.no_grad():
            weight = _weight_out_in(gm, layer_node, kind)
            _set_weight(gm, layer_node, kind, weight + fold_delta(*params, **node.kwargs).to(weight.dtype))
        remove_output_delta(gm, node)
        count += 1
    gm.recompile()
    return count


def drop_unused_parameters(gm: torch.fx.GraphModule) -> None:
    """Delete parameters no ``get_attr`` node reads any more (folded adapter parameters)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()):
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, attr)
