"""The ONNX exporter paths ``graphopt.export`` tries, in order, and which one wrote the file.

1. ``"dynamo"`` — ``torch.onnx.export(..., dynamo=True)`` on the graph as it is (with the methods' ONNX
   translations of their custom ops).
2. ``"dynamo, contiguous views"`` — the same after every ``aten.view`` / ``aten.reshape`` reads a contiguous
   copy of its input (the same values; an ONNX ``Identity``). The exporter's decomposition re-derives
   strides and can refuse a view the captured graph recorded (T5's and Swin's attention output
   ``attn.transpose(1, 2)`` viewed as ``(B, T, H)``: "Cannot view a tensor with shape ... and strides").
3. ``"torchscript"`` — the TorchScript-based exporter (``dynamo=False``), the batch dim and the other
   dynamic dims as ``dynamic_axes``. It cannot translate graphopt's custom ops, so it only helps graphs
   without them (``merge=True``).

The first path that writes a file wins; :class:`graphopt.export.ExportReport` names it (``exporter``). When
every path fails, the :class:`~graphopt.ExportError` lists each path's error.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from graphopt.capture import bound_tensors
from graphopt.errors import ExportError
from graphopt.inputs import CallInputs, Dims
from graphopt.quiet import quiet_torch_internals

aten = torch.ops.aten


def contiguous_views(gm: torch.fx.GraphModule) -> int:
    """Make every ``aten.view`` / ``aten.reshape`` read ``clone(x, memory_format=contiguous)``, in place;
    returns the count."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in (aten.view.default, aten.reshape.default):
            with gm.graph.inserting_before(node):
                copy = gm.graph.call_function(aten.clone.default, (node.args[0],),
                                              {"memory_format": torch.contiguous_format})
            copy.meta.update({k: v for k, v in node.args[0].meta.items() if k == "val"})
            node.update_arg(0, copy)
            count += 1
    gm.recompile()
    return count


def _dynamo(gm: torch.fx.GraphModule, path: Path, inputs: CallInputs, dynamic: Any,
            translations: dict[Any, Any], dims: Dims) -> None:
    torch.onnx.export(gm, inputs.args, str(path), kwargs=inputs.kwargs or None, dynamo=True,
                      dynamic_shapes=dynamic, custom_translation_table=translations or None, verbose=False)


def _contiguous(gm: torch.fx.GraphModule, path: Path, inputs: CallInputs, dynamic: Any,
              translations: dict[Any, Any], dims: Dims) -> None:
    if not contiguous_views(gm):
        raise ExportError("the graph has no view to rewrite")
    _dynamo(gm, path, inputs, dynamic, translations, dims)


def _torchscript(gm: torch.fx.GraphModule, path: Path, inputs: CallInputs, dynamic: Any,
                 translations: dict[Any, Any], dims: Dims) -> None:
    keys = [key for key, _ in bound_tensors(gm.forward, inputs)]
    names = [f"input_{key}" if isinstance(key, int) else str(key) for key in keys]
    axes = {name: {d: f"{name}_dim{d}" if d else "batch" for d in sorted({0, *dims.get(key, ())})}
            for name, key in zip(names, keys)}
    args: tuple[Any, ...] = (*inputs.args, inputs.kwargs) if inputs.kwargs else inputs.args
    torch.onnx.export(gm, args, str(path), dynamo=False, input_names=names, dynamic_axes=axes, verbose=False)


PATHS: tuple[tuple[str, Callable[..., None]], ...] = (
    ("dynamo", _dynamo),
    ("dynamo, contiguous views", _contiguous),
    ("torchscript", _torchscript),
)


def export_onnx_file(gm: torch.fx.GraphModule, path: Path, inputs: CallInputs, dynamic: Any,
                     translations: dict[Any, Any], dims: Dims) -> str:
    """Write ``gm`` to ``path`` by the first exporter path of :data:`PATHS` that works; returns its name."""
    failures = []
    for name, run in PATHS:
        try:
            with quiet_torch_internals():
                run(gm, path, inputs, dynamic, translations, dims)
            return name
        except Exception as err:
            text = str(err).strip()
            reason = next((line for line in text.splitlines() if "Error" in line and "Create" not in line),
                          text.splitlines()[0] if text else "(no message)")
            failures.append(f"{name}: {type(err).__name__}: {reason.strip()[:400]}")
    raise ExportError(f"torch.onnx.export failed for {path.name} on every exporter path (nothing was written):"
                      + "".join(f"\n  {failure}" for failure in failures))
