"""Stochastic depth ("drop path", Huang et al. 2016) written out in tensor ops, found and removed in the
inference graph.

Models implement it in Python behind ``if not self.training: return x`` (HF Swin, ConvNeXt, BEiT; timm),
so a training-mode capture records the training branch, ``x / keep · floor(keep + rand(B, 1, …))`` (or
``x / keep · bernoulli(keep)``), which an inference flag cannot switch off. Its inference value is ``x``:
:func:`remove_drop_paths` replaces each such product by ``x``.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten
_RANDOM = {aten.rand.default, aten.rand_like.default}
_BERNOULLI = {aten.bernoulli.p, aten.bernoulli_.float, aten.bernoulli.default}


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _mask_keep(node: object) -> float | None:
    """``keep`` when ``node`` is ``floor(keep + rand(...))`` or ``bernoulli(..., keep)``, else None."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    if node.target in _BERNOULLI and len(node.args) > 1:
        return _number(node.args[1])
    if node.target not in (aten.floor.default, aten.floor_.default):
        return None
    add = node.args[0]
    if not isinstance(add, torch.fx.Node) or add.target is not aten.add.Tensor:
        return None
    a, b = add.args[:2]
    rand, keep = (a, b) if isinstance(a, torch.fx.Node) else (b, a)
    if not isinstance(rand, torch.fx.Node) or rand.target not in _RANDOM:
        return None
    return _number(keep)


def _scaled_input(node: object, keep: float) -> torch.fx.Node | None:
    """``x`` when ``node`` is ``x / keep`` (or ``x · (1/keep)``), else None."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or len(node.args) < 2:
        return None
    x, factor = node.args[:2]
    value = _number(factor)
    if value is None or not isinstance(x, torch.fx.Node):
        return None
    if node.target in (aten.div.Tensor, aten.div.Scalar) and abs(value - keep) < 1e-12:
        return x
    if node.target in (aten.mul.Tensor, aten.mul.Scalar) and abs(value * keep - 1) < 1e-9:
        return x
    return None


def remove_drop_paths(gm: torch.fx.GraphModule) -> int:
    """Replace every ``(x / keep) · mask`` drop-path product by ``x`` in place; returns the count."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.mul.Tensor or len(node.args) != 2:
            continue
        for scaled, mask in (node.args, node.args[::-1]):
            keep = _mask_keep(mask)
            x = None if keep is None else _scaled_input(scaled, keep)
            if x is not None:
                node.replace_all_uses_with(x)
                gm.graph.erase_node(node)
                count += 1
                break
    if count:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return count
