"""The metadata keys graphopt writes on graph nodes and graph modules, listed once, with their accessors.

| key | where | set by | meaning |
|---|---|---|---|
| ``graphopt_layer`` | ``node.meta`` | adapter helpers, tract | module path of the layer the node rewrites |
| ``graphopt_update`` | ``node.meta["custom"]`` | the training step | the parameter (or bucket) the node updates |
| ``graphopt_gather`` | ``node.meta["custom"]`` | the training step | the parameter bucket a full-shard gather fetches |
| ``graphopt_cut`` | ``node.meta`` | layer dropping | a ``detach`` where backward stops |
| ``graphopt_capture`` | ``gm.meta`` | capture | which path captured the graph |
| ``graphopt_dynamic_dims`` | ``gm.meta`` | capture | per input, the dims kept dynamic |
| ``graphopt_export_error`` | ``gm.meta`` | capture | why ``torch.export`` failed when ``symbolic_trace`` was used |
"""

from __future__ import annotations

from typing import Any

import torch

LAYER = "graphopt_layer"
UPDATE = "graphopt_update"
GATHER = "graphopt_gather"
CUT = "graphopt_cut"
CAPTURE = "graphopt_capture"
DYNAMIC_DIMS = "graphopt_dynamic_dims"
EXPORT_ERROR = "graphopt_export_error"


def layer_path(node: torch.fx.Node) -> str | None:
    """The module path of the layer ``node`` rewrites (adapter and tract nodes), else None."""
    return node.meta.get(LAYER)


def set_layer_path(node: torch.fx.Node, path: str) -> None:
    node.meta[LAYER] = path


def update_tag(node: torch.fx.Node) -> str | None:
    """The parameter name a node's update belongs to, or None for nodes that are not updates."""
    custom = node.meta.get("custom") or {}
    return custom.get(UPDATE)


def update_annotation(name: str) -> dict[str, str]:
    """What ``torch.fx.traceback.annotate`` records on the nodes of parameter ``name``'s update."""
    return {UPDATE: name}


def gather_tag(node: torch.fx.Node) -> int | None:
    """The bucket whose parameters the node gathers (``sharding="full"``), or None."""
    custom = node.meta.get("custom") or {}
    return custom.get(GATHER)


def gather_annotation(bucket: int) -> dict[str, int]:
    """What ``torch.fx.traceback.annotate`` records on the nodes gathering parameter bucket ``bucket``."""
    return {GATHER: bucket}


def is_cut(node: torch.fx.Node) -> bool:
    return bool(node.meta.get(CUT))


def mark_cut(node: torch.fx.Node) -> None:
    node.meta[CUT] = True


def capture_path(gm: torch.fx.GraphModule) -> str | None:
    """``"torch.export"``, ``"symbolic_trace"`` or ``"plugin"``: how ``gm`` was captured."""
    return gm.meta.get(CAPTURE)


def captured_dynamic_dims(gm: torch.fx.GraphModule) -> Any:
    """Per input, the dims ``gm`` was captured with as dynamic (see ``graphopt.capture``)."""
    return gm.meta.get(DYNAMIC_DIMS)


def set_capture_info(gm: torch.fx.GraphModule, path: str, dynamic_dims: Any, export_error: str | None = None) -> None:
    """Record how ``gm`` was captured; an earlier record (a plugin's own) is kept."""
    gm.meta.setdefault(CAPTURE, path)
    gm.meta.setdefault(DYNAMIC_DIMS, dynamic_dims)
    if export_error is not None:
        gm.meta[EXPORT_ERROR] = export_error
