"""Nodes that hand their input on unchanged: casts to the same dtype, ``contiguous``/``clone``, views and
reshapes that keep the shape, dropout that cannot drop (``p = 0`` or not training), and the metadata
asserts ``torch.export`` records around casts.

Pattern matchers (block discovery, layer recognition) look through them: Llama's RMSNorm calls
``x.to(torch.float32)`` on a float32 stream, which the graph records as ``aten.to.dtype`` although it
changes nothing.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten

_SAME_VALUE = {
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.type_as.default,
    aten.contiguous.default, aten.clone.default, aten.alias.default,
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
    aten.flatten.using_ints,
}
_DROPOUTS = {aten.dropout.default, aten.native_dropout.default, aten.feature_dropout.default}
ASSERTS = {aten._assert_tensor_metadata.default}


def _val(node: object) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.device == b.device
            and str(tuple(a.shape)) == str(tuple(b.shape)))


def is_noop(node: torch.fx.Node) -> bool:
    """Whether ``node`` returns its first argument's value unchanged (same shape, dtype and device)."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    if node.target in _DROPOUTS:
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        if not (p == 0 or train is False):
            return False
    elif node.target not in _SAME_VALUE:
        return False
    source, result = _val(node.args[0]), _val(node)
    return source is not None and result is not None and _same(source, result)


def skip_noops(node: torch.fx.Node) -> torch.fx.Node:
    """The node whose value ``node`` carries: ``node`` itself, or the source of the no-ops ending in it."""
    while is_noop(node):
        node = node.args[0]
    return node
