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
_INPUT_INDEX = {"linear": 0, "conv2d": 0, "conv1d": 0, "addmm": 1}
_WEIGHT_INDEX = {"linear": 1, "conv2d": 1, "conv1d": 1, "addmm": 2}


def weight_groups(ctx: MethodContext, layers: Sequence[LayerCall]) -> list[list[LayerCall]]:
    """``layers`` grouped by the weight tensor they read, in order of first call: a layer called several times
    (ALBERT's shared layer) or two layers tied to one weight get one adapter, applied at every call."""
    groups: dict[int, list[LayerCall]] = {}
    for layer in layers:
        groups.setdefault(id(ctx.parameter(layer.weight.target)), []).append(layer)
    return list(groups.values())


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


def _untie(gm: torch.fx.GraphModule, target: str, readers: set[torch.fx.Node]) -> None:
    """Folding replaces the tensor ``target`` for every node that reads it under that name: only ``readers``
    (every call of the adapted layer) may. Another reader of a tied weight (an embedding reading the LM
    head's weight) is moved to another name of the same tensor, so it keeps the original values."""
    others = [(n, u) for n in gm.graph.nodes if n.op == "get_attr" and n.target == target
              for u in list(n.users) if u not in readers]
    if not others:
        return
    tensor = _attr_named(gm, target)
    owner = gm.get_submodule(target.rpartition(".")[0]) if "." in target else gm
    alias = next((name for name, p in gm.named_parameters(remove_duplicate=False) if p is tensor and name != target
                  and (gm.get_submodule(name.rpartition(".")[0]) if "." in name else gm) is not owner), None)
    if alias is None:
        raise ExportError(f"cannot fold the adapter into {target}: the tensor is also read by "
                          f"{', '.join(u.name for _, u in others)} (tied weights, e.g. an LM head and its embedding); "
                          "exclude the layer from targets or export with merge=False")
    for node, user in others:
        with gm.graph.inserting_before(user):
            moved = gm.graph.get_attr(alias)
        moved.meta.update(node.meta)
        user.replace_input_with(node, moved)


def _attr_named(gm: torch.fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _set_weights(gm: torch.fx.GraphModule, layer_nodes: list[torch.fx.Node], weight_out_in: torch.Tensor) -> None:
    """Give every call in ``layer_nodes`` (the calls of one weight) the weight ``weight_out_in``, once."""
    targets = dict.fromkeys(_weight_node(n).target for n in layer_nodes)
    old = _attr_named(gm, next(iter(targets)))
    value = weight_out_in.t() if _layer_kind(layer_nodes[0]) == "addmm" else weight_out_in
    folded = torch.nn.Parameter(value.detach().to(old.dtype).contiguous(), requires_grad=False)
    for target in targets:
        _untie(gm, target, set(layer_nodes))
        owner, _, name = target.rpartition(".")
        setattr(gm.get_submodule(owner) if owner else gm, name, folded)


def _weight_node(layer_node: torch.fx.Node) -> torch.fx.Node:
    return layer_node.args[2] if _layer_kind(layer_node) == "addmm" else layer_node.args[1]


def _layer_kind(node: torch.fx.Node) -> str:
    return {aten.linear.default: "linear", aten.addmm.default: "addmm", aten.conv2d.default: "conv2d",
            aten.conv1d.default: "conv1d"}[node.target]


def _weight_out_in(gm: torch.fx.GraphModule, layer_node: torch.fx.Node) -> torch.Tensor:
    weight = _attr(gm, _weight_node(layer_node)).detach()
    return weight.t() if _layer_kind(layer_node) == "addmm" else weight


def _shared_groups(gm: torch.fx.GraphModule, fn: Callable[..., Any]) -> list[list[torch.fx.Node]]:
    """The ``fn`` nodes grouped by the adapter they apply (the same parameters and options): a shared layer
    has one adapter applied at each of its calls, folded once."""
    groups: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is fn:
            params = [a.target if isinstance(a, torch.fx.Node) else repr(a) for a in node.args[1:]]
            groups.setdefault(repr((params, sorted(node.kwargs.items()))), []).append(node)
    return list(groups.values())


def fold_input_transforms(gm: torch.fx.GraphModule, fn: Callable[..., Any],
                          fold_weight: Callable[..., torch.Tensor]) -> int:
    """Fold every ``fn`` input-transform node: ``W ← fold_weight(W, *params, **kwargs)`` once per adapted
    weight, however many calls read it; returns the number of nodes folded."""
    count = 0
    for group in _shared_groups(gm, fn):
        first = group[0]
        params = [_attr(gm, p).detach() for p in first.args[1:]]
        layer_nodes = [user for node in group for user in node.users]
        with torch.no_grad():
            _set_weights(gm, layer_nodes, fold_weight(_weight_out_in(gm, layer_nodes[0]), *params, **first.kwargs))
        for node in group:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        count += len(group)
    gm.recompile()
    return count


def fold_weight_transforms(gm: torch.fx.GraphModule, fn: Callable[..., Any],
                           fold_weight: Callable[..., torch.Tensor] | None = None) -> int:
    """Fold every ``fn`` weight-transform node: ``W ← fold_weight(W, *params, **kwargs)`` (default ``fn``
    itself, in the weight's own layout) once per adapted weight; the layers read ``W`` again. Returns the
    number of nodes folded."""
    count = 0
    for group in _shared_groups(gm, fn):
        first = group[0]
        weight_nodes = [node.args[0] for node in group]
        params = [_attr(gm, p).detach() for p in first.args[1:]]
        old = _attr(gm, weight_nodes[0])
        with torch.no_grad():
            value = (fold_weight or fn)(old.detach(), *params, **first.kwargs)
        folded = torch.nn.Parameter(value.to(old.dtype).contiguous(), requires_grad=False)
        for target in dict.fromkeys(w.target for w in weight_nodes):
            _untie(gm, target, set(group))
            owner, _, name = target.rpartition(".")
            setattr(gm.get_submodule(owner) if owner else gm, name, folded)
        for node, weight_node in zip(group, weight_nodes):
            node.replace_all_uses_with(weight_node)
            gm.graph.erase_node(node)
        count += len(group)
    gm.recompile()
    return count


def fold_output_deltas(gm: torch.fx.GraphModule, fn: Callable[..., Any],
                       fold_delta: Callable[..., torch.Tensor]) -> int:
    """Fold every ``y + fn(x, *params)`` branch: ``W ← W + fold_delta(*params, **kwargs)`` once per adapted
    weight, however many calls read it; returns the number of branches folded."""
    count = 0
    for group in _shared_groups(gm, fn):
        first = group[0]
        layer_nodes = [next(a for a in next(iter(node.users)).args if a is not node) for node in group]
        params = [_attr(gm, p).detach() for p in first.args[1:]]
        with torch.no_grad():
            weight = _weight_out_in(gm, layer_nodes[0])
            _set_weights(gm, layer_nodes, weight + fold_delta(*params, **first.kwargs).to(weight.dtype))
        for node in group:
            remove_output_delta(gm, node)
        count += len(group)
    gm.recompile()
    return count


def drop_unused_parameters(gm: torch.fx.GraphModule) -> None:
    """Delete parameters no ``get_attr`` node reads any more (folded adapter parameters)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()):
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, attr)
