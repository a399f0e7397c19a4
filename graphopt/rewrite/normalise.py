"""Layers recognised by what the graph computes, not by the module class that computed them.

Run once on every captured graph, before any method sees it, so every method sees one form:

- ``x @ Wᵀ (+ b)`` on a parameter ``W (out, in)`` — ``matmul(x, numpy_T(W))``, ``matmul(x, t(W))``,
  ``matmul(x, transpose(W, 0, 1))`` or ``permute(W, [1, 0])``, then ``+ b`` with ``b (out,)`` a parameter —
  becomes ``aten.linear(x, W, b)``: a linear layer whatever module owns it (Falcon's ``FalconLinear``
  computes ``x @ self.weight.T + self.bias``). The layer is named by its module path, from the weight.
- ``aten.conv1d.padding`` / ``aten.conv2d.padding`` (``padding="valid"`` or ``"same"``) become the
  ``.default`` overloads with numbers (``"valid"``: 0; ``"same"``: ``dilation·(k − 1)/2`` per side) when the
  padding is symmetric; an even kernel's ``"same"`` pads one side more and stays as it is.
"""

from __future__ import annotations

import torch

from graphopt.rewrite.noops import skip_noops

aten = torch.ops.aten
_TRANSPOSES = {aten.numpy_T.default, aten.t.default, aten.transpose.int, aten.permute.default}
_PADDED = {aten.conv1d.padding: (aten.conv1d.default, 1), aten.conv2d.padding: (aten.conv2d.default, 2)}


def _parameter(gm: torch.fx.GraphModule, node: object, dims: int) -> bool:
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return False
    owner, _, name = node.target.rpartition(".")
    value = getattr(gm.get_submodule(owner) if owner else gm, name, None)
    return isinstance(value, torch.Tensor) and value.dim() == dims and value.is_floating_point()


def _transposed_weight(gm: torch.fx.GraphModule, node: object) -> torch.fx.Node | None:
    """``W`` when ``node`` is ``Wᵀ`` of a 2-d parameter ``W``, else None."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or node.target not in _TRANSPOSES:
        return None
    if node.target is aten.transpose.int and sorted(d % 2 for d in node.args[1:3]) != [0, 1]:
        return None
    if node.target is aten.permute.default and list(node.args[1]) not in ([1, 0], [-1, -2], [1, -2], [-1, 0]):
        return None
    weight = node.args[0]
    return weight if _parameter(gm, weight, 2) else None


def _bias_of(gm: torch.fx.GraphModule, matmul: torch.fx.Node,
             out_features: int) -> tuple[torch.fx.Node | None, torch.fx.Node | None]:
    """``(the add node, b)`` when ``matmul``'s only user is ``matmul + b`` with ``b (out,)`` a parameter."""
    if len(matmul.users) != 1:
        return None, None
    (user,) = matmul.users
    if user.op != "call_function" or user.target is not aten.add.Tensor or user.kwargs.get("alpha", 1) != 1:
        return None, None
    other = user.args[1] if user.args[0] is matmul else user.args[0]
    if not _parameter(gm, other, 1):
        return None, None
    owner, _, name = other.target.rpartition(".")
    bias = getattr(gm.get_submodule(owner) if owner else gm, name)
    return (user, other) if bias.shape[0] == out_features else (None, None)


def linear_layers(gm: torch.fx.GraphModule) -> int:
    """Rewrite every ``x @ Wᵀ (+ b)`` on parameters into ``aten.linear(x, W, b)`` in place; returns the count."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.matmul.default, aten.mm.default):
            continue
        weight = _transposed_weight(gm, skip_noops(node.args[1]))
        x = node.args[0]
        val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        if weight is None or not isinstance(val, torch.Tensor) or val.dim() < 1:
            continue
        owner, _, name = weight.target.rpartition(".")
        out_features = getattr(gm.get_submodule(owner) if owner else gm, name).shape[0]
        add, bias = _bias_of(gm, node, out_features)
        with gm.graph.inserting_before(add or node):
            linear = gm.graph.call_function(aten.linear.default, (x, weight, bias))
        result = add or node
        linear.meta.update({k: v for k, v in result.meta.items() if k in ("val", "nn_module_stack", "stack_trace")})
        result.replace_all_uses_with(linear)
        transposed = node.args[1]
        for dead in (add, node, transposed):
            if isinstance(dead, torch.fx.Node) and not dead.users:
                gm.graph.erase_node(dead)
        count += 1
    if count:
        gm.recompile()
    return count


def _numeric_padding(padding: str, kernel: tuple[int, ...], dilation: list[int]) -> list[int] | None:
    if padding == "valid":
        return [0] * len(kernel)
    totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
    return None if any(t % 2 for t in totals) else [t // 2 for t in totals]


def conv_padding(gm: torch.fx.GraphModule) -> int:
    """Rewrite ``conv1d/conv2d.padding`` calls (string padding) into ``.default`` with numbers; returns the count."""
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _PADDED:
            continue
        target, dims = _PADDED[node.target]
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        given = dict(zip(names, node.args)) | dict(node.kwargs)
        weight = given["weight"].meta.get("val") if isinstance(given["weight"], torch.fx.Node) else None
        if not isinstance(weight, torch.Tensor):
            continue
        stride = list(given.get("stride", [1] * dims))
        dilation = list(given.get("dilation", [1] * dims))
        padding = _numeric_padding(given.get("padding", "valid"), tuple(weight.shape[2:]), dilation)
        if padding is None:
            continue
        node.target = target
        node.args = (given["input"], given["weight"], given.get("bias"), stride, padding, dilation,
                     given.get("groups", 1))
        node.kwargs = {}
        count += 1
    if count:
        gm.recompile()
    return count


def normalise(gm: torch.fx.GraphModule) -> None:
    """Every rewrite of this module, in place."""
    linear_layers(gm)
    conv_padding(gm)
