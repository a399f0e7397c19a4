"""Finding the layer calls methods rewrite: linear and conv calls on ``get_attr`` weights.

A layer is named by its module path, taken from the weight attribute (``encoder.0.fc1.weight`` →
``encoder.0.fc1``), so names match ``model.named_modules()``.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from graphopt.errors import OptionError

aten = torch.ops.aten
_CONVS = {aten.conv2d.default: "conv2d", aten.conv1d.default: "conv1d"}
DEFAULT_KINDS = ("linear", "conv2d", "conv1d", "addmm")


@dataclass
class LayerCall:
    """One linear or conv call in a graph.

    ``kind`` is ``"linear"`` (``aten.linear(x, W, b)``, ``W (out, in)``), ``"conv2d"``
    (``aten.conv2d(x, W, b, stride, padding, dilation, groups)``), ``"conv1d"`` (the same with
    ``W (out, C/groups, k)``) or ``"addmm"``
    (``aten.addmm(b, x, W)`` with ``W (in, out)``, as transformers' ``Conv1D``).
    """

    node: torch.fx.Node
    path: str
    kind: str
    weight: torch.fx.Node
    bias: torch.fx.Node | None
    weight_shape: tuple[int, ...]

    @property
    def in_features(self) -> int:
        """Input dimension of the layer as a matrix (``C_in/groups · kh · kw`` for conv)."""
        if self.kind == "addmm":
            return self.weight_shape[0]
        if self.kind in ("conv2d", "conv1d"):
            return math.prod(self.weight_shape[1:])
        return self.weight_shape[1]

    @property
    def out_features(self) -> int:
        return self.weight_shape[1] if self.kind == "addmm" else self.weight_shape[0]

    @property
    def conv_options(self) -> dict[str, object]:
        """``stride``, ``padding``, ``dilation``, ``groups`` of a conv call (aten's defaults where omitted)."""
        names = ("stride", "padding", "dilation", "groups")
        dims = len(self.weight_shape) - 2
        defaults = ([1] * dims, [0] * dims, [1] * dims, 1)
        given = self.node.args[3:7]
        return {n: (given[i] if i < len(given) else d) for i, (n, d) in enumerate(zip(names, defaults))}


def _attr_tensor(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor | None:
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    owner, _, attr = node.target.rpartition(".")
    value = getattr(gm.get_submodule(owner), attr, None)
    return value if isinstance(value, torch.Tensor) else None


def call_path(gm: torch.fx.GraphModule, node: torch.fx.Node, weight: torch.fx.Node) -> str:
    """The module path of the call ``node`` reading the parameter ``weight``: the weight's owner, unless the
    weight is tied and read under another module's name (T5's embeddings and Gemma's embedding read the
    tied ``lm_head.weight``): then the innermost module running ``node`` that holds the same tensor under a
    name of its own."""
    owner = weight.target.rpartition(".")[0]
    stack = [v[0] for v in (node.meta.get("nn_module_stack") or {}).values()
             if isinstance(v, tuple) and v and isinstance(v[0], str) and v[0]]
    if not stack or owner in stack:
        return owner
    tensor = _attr_tensor(gm, weight)
    for path in reversed(stack):
        try:
            module = gm.get_submodule(path)
        except AttributeError:
            continue
        if any(p is tensor for p in module.parameters(recurse=False)):
            return path
    return owner


def layer_calls(gm: torch.fx.GraphModule, kinds: Iterable[str] = DEFAULT_KINDS) -> list[LayerCall]:
    """Linear/conv calls whose weight is a module attribute, in execution order."""
    wanted = set(kinds)
    found: list[LayerCall] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.linear.default and "linear" in wanted:
            kind, w, b = "linear", node.args[1], node.args[2] if len(node.args) > 2 else None
        elif node.target in _CONVS and _CONVS[node.target] in wanted:
            kind, w, b = _CONVS[node.target], node.args[1], node.args[2] if len(node.args) > 2 else None
        elif node.target is aten.addmm.default and "addmm" in wanted:
            kind, w, b = "addmm", node.args[2], node.args[0]
        else:
            continue
        weight = _attr_tensor(gm, w)
        if weight is None or (b is not None and _attr_tensor(gm, b) is None):
            continue
        path = call_path(gm, node, w)
        found.append(LayerCall(node, path, kind, w, b, tuple(weight.shape)))
    return found


def select_layers(
    layers: Sequence[LayerCall], targets: str | Iterable[str] | None, method: str, what: str = "linear"
) -> list[LayerCall]:
    """The layers whose path matches any glob in ``targets`` (all when None); no match is an ``OptionError``."""
    if targets is None:
        chosen = list(layers)
        if not chosen:
            raise OptionError(f"method {method!r}: the model has no {what} layer to rewrite")
        return chosen
    patterns = [targets] if isinstance(targets, str) else list(targets)
    chosen = [layer for layer in layers if any(fnmatch.fnmatchcase(layer.path, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(layer.path, p) for layer in layers)]
    if unmatched or not chosen:
        available = ", ".join(sorted({layer.path for layer in layers})) or "none"
        raise OptionError(
            f"method {method!r}: targets pattern {unmatched[0] if unmatched else patterns!r} matches no {what} "
            f"layer; available {what} layers: {available}"
        )
    return chosen


def module_types(gm: torch.fx.GraphModule) -> dict[str, str]:
    """Module path → type name, from the ``nn_module_stack`` the capture recorded (and the graph's own
    submodules where no node names one)."""
    found: dict[str, str] = {}
    for node in gm.graph.nodes:
        for value in (node.meta.get("nn_module_stack") or {}).values():
            if isinstance(value, tuple) and len(value) > 1 and isinstance(value[0], str):
                kind = value[1]
                name = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
                found.setdefault(value[0], name.rpartition(".")[2])
    for path, module in gm.named_modules():
        if path and path not in found and type(module) not in (torch.nn.Module, torch.fx.GraphModule):
            found[path] = type(module).__name__
    return found


def check_rank(method: str, r: int, layers: Sequence[LayerCall]) -> None:
    """An ``OptionError`` when rank ``r`` exceeds the larger side of a layer: a low-rank branch wider than the
    layer itself only adds parameters (``r=100000`` on an 8-wide layer would add millions)."""
    for layer in layers:
        limit = max(layer.in_features, layer.out_features)
        if r > limit:
            raise OptionError(f"method {method!r}: option r={r} is larger than layer {layer.path!r} "
                              f"({layer.in_features} -> {layer.out_features}); use r <= {limit} or exclude the layer "
                              "from targets")
