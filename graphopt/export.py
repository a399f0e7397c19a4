"""Export: the rewritten model in inference form to ``.onnx``, ``.pt2`` or ``.py`` (format from the suffix).

With ``merge=True`` the methods' export passes fold their nodes into plain weights first, so the file
holds a plain model; with ``merge=False`` they leave their compact form (``CompiledModel.export_graph``).
Every file is checked: ONNX with ``onnx.checker`` and onnxruntime against PyTorch (max abs difference
over ``atol`` is an error), ``.pt2`` by loading it back and running it.
The batch dimension (dim 0 of every tensor input) is dynamic in ``.onnx`` and ``.pt2``; more dynamic
dims (a sequence length) come from ``graphopt.compile(..., dynamic_dims=...)`` (kept with the captured
graph) or from ``export(..., dynamic_dims=...)`` (same format: one entry per positional input, dim
indices or None). The files are checked on the example inputs and again on inputs grown by one along
every dim the file kept dynamic (rows repeated, so token ids stay valid), so a dim the exporter
specialised shows up as a static dim in the file, never as wrong numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from graphopt.capture import DynamicDims, dynamic_shapes, normalise_dynamic_dims
from graphopt.errors import ExportError
from graphopt.quiet import quiet_torch_internals
from graphopt.rewrite.meta import captured_dynamic_dims

FORMATS = (".onnx", ".pt2", ".py")


@dataclass(frozen=True)
class ExportReport:
    """What ``export`` wrote and how closely the file reproduces the PyTorch model."""

    path: Path
    format: str
    max_abs_diff: float | None
    checked_shapes: tuple[tuple[tuple[int, ...] | None, ...], ...] = ()  # input shapes the file was run on

    def __str__(self) -> str:
        diff = "" if self.max_abs_diff is None else f", max |Δ| vs PyTorch = {self.max_abs_diff:.3g}"
        return f"wrote {self.path} ({self.format}{diff})"


def export(model: Any, path: str | os.PathLike[str], example_inputs: tuple[Any, ...] | None = None,
           merge: bool = True, atol: float = 1e-4, dynamic_dims: DynamicDims | None = None) -> ExportReport:
    """Write ``model`` (a compiled model) to ``path``; ``.onnx``/``.pt2`` are checked against PyTorch.

    ``dynamic_dims``: the input dims kept dynamic (default: those the model was captured with).
    """
    path = Path(path)
    if path.suffix not in FORMATS:
        raise ExportError(f"cannot export to {path.name!r}: use a path ending in one of {', '.join(FORMATS)}")
    captured = model.captured
    if example_inputs is None:
        example_inputs = captured.example_inputs
    example_inputs = tuple(example_inputs)
    if dynamic_dims is None:
        dynamic_dims = captured_dynamic_dims(captured.gm)
    dims = normalise_dynamic_dims(example_inputs, dynamic_dims)
    gm = captured.export_graph(merge)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        expected = gm(*example_inputs)
    if path.suffix == ".py":
        path.write_text(_python_source(gm, model, merge))
        return ExportReport(path, "fx-python", None)
    if path.suffix == ".pt2":
        return _export_pt2(gm, path, example_inputs, expected, atol, dims)
    return _export_onnx(gm, path, example_inputs, expected, atol, captured.onnx_translations(), dims)


def _python_source(gm: torch.fx.GraphModule, model: Any, merge: bool) -> str:
    specs = ", ".join(m.spec() for m in model.methods)
    header = (f"# FX code of {model.model_name} rewritten by graphopt [{specs}], merge={merge}\n"
              f"# parameters: {sum(p.numel() for p in gm.parameters())}\n")
    return header + gm.print_readable(print_output=False)


def _max_diff(expected: Any, actual: Any) -> float:
    exp_leaves = [x for x in pytree.tree_leaves(expected) if isinstance(x, torch.Tensor)]
    act_leaves = [torch.as_tensor(x) for x in pytree.tree_leaves(actual)]
    if len(exp_leaves) != len(act_leaves):
        raise ExportError(f"the exported file returns {len(act_leaves)} outputs, PyTorch returns {len(exp_leaves)}")
    diffs = [(e.double() - a.double()).abs().max().item() for e, a in zip(exp_leaves, act_leaves) if e.numel()]
    return max(diffs, default=0.0)


def _check(diff: float, atol: float, path: Path) -> None:
    if not diff <= atol:
        raise ExportError(f"{path} differs from the PyTorch model by {diff:.3g} (> atol={atol:g})")


def _shapes(inputs: tuple[Any, ...]) -> tuple[tuple[int, ...] | None, ...]:
    return tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in inputs)


def grown_inputs(example_inputs: tuple[Any, ...], dims: tuple[tuple[int, ...] | None, ...]) -> tuple[Any, ...] | None:
    """``example_inputs`` one longer along each dim in ``dims`` (the first slice repeated); None if no dim."""
    if not any(dims):
        return None
    grown = []
    for x, input_dims in zip(example_inputs, dims):
        for d in input_dims or ():
            x = torch.cat([x, x.narrow(d, 0, 1)], dim=d)
        grown.append(x)
    return tuple(grown)


def _kept_dims(example_inputs: tuple[Any, ...], dims: tuple[tuple[int, ...] | None, ...],
               file_shapes: list[Any]) -> tuple[tuple[int, ...] | None, ...]:
    """The requested ``dims`` the written file kept dynamic; ``file_shapes``: one per tensor input, where a
    static dim is an ``int`` (a dynamic one a name or a SymInt)."""
    shapes = iter(file_shapes)
    kept: list[tuple[int, ...] | None] = []
    for x, input_dims in zip(example_inputs, dims):
        shape = next(shapes, None) if isinstance(x, torch.Tensor) else None
        keep = tuple(d for d in input_dims or () if shape is not None and not isinstance(shape[d], int))
        kept.append(keep or None)
    return tuple(kept)


def _reference(gm: torch.fx.GraphModule, inputs: tuple[Any, ...] | None) -> Any:
    """PyTorch's output on ``inputs``; None when there are none or the model itself rejects them (a model
    may constrain a dim, e.g. an even batch): then the file is checked on the example inputs only."""
    if inputs is None:
        return None
    try:
        with torch.no_grad():
            return gm(*inputs)
    except Exception:
        return None


def _export_pt2(gm: torch.fx.GraphModule, path: Path, example_inputs: tuple[Any, ...], expected: Any,
                atol: float, dims: tuple[tuple[int, ...] | None, ...]) -> ExportReport:
    program = torch.export.export(gm, example_inputs, strict=False, dynamic_shapes=dynamic_shapes(example_inputs, dims))
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    with torch.no_grad():
        reloaded = loaded.module()(*example_inputs)
    diff = _max_diff(expected, reloaded)
    checked = [_shapes(example_inputs)]
    placeholders = [n.meta["val"] for n in loaded.graph.nodes
                    if n.op == "placeholder" and n.name in loaded.graph_signature.user_inputs]
    user_shapes = [tuple(v.shape) for v in placeholders if isinstance(v, torch.Tensor)]
    grown = grown_inputs(example_inputs, _kept_dims(example_inputs, dims, user_shapes))
    grown_expected = _reference(gm, grown)
    if grown_expected is not None:
        with torch.no_grad():
            diff = max(diff, _max_diff(grown_expected, loaded.module()(*grown)))
        checked.append(_shapes(grown))
    _check(diff, atol, path)
    return ExportReport(path, "pt2", diff, tuple(checked))


def _export_onnx(gm: torch.fx.GraphModule, path: Path, example_inputs: tuple[Any, ...], expected: Any,
                 atol: float, translations: dict[Any, Any], dims: tuple[tuple[int, ...] | None, ...]) -> ExportReport:
    import onnx
    import onnxruntime

    batch = torch.export.Dim("batch")  # one name for every input's dim 0; other dims are inferred (AUTO)
    dynamic = tuple(None if d is None else {i: batch if i == 0 else torch.export.Dim.AUTO for i in d} for d in dims)
    try:
        with quiet_torch_internals():
            torch.onnx.export(gm, example_inputs, str(path), dynamo=True, dynamic_shapes=dynamic,
                              custom_translation_table=translations or None, verbose=False)
    except Exception as err:
        raise ExportError(f"torch.onnx.export failed for {path}: {type(err).__name__}: {err}") from err
    onnx.checker.check_model(str(path))
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:
        dtypes = {x.dtype for x in example_inputs if isinstance(x, torch.Tensor)}
        hint = "; onnxruntime lacks many float64 kernels: export a float32 model" if torch.float64 in dtypes else ""
        raise ExportError(f"onnxruntime cannot load {path}: {err}{hint}") from err
    def run(inputs: tuple[Any, ...]) -> list[Any]:
        tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
        return session.run(None, {arg.name: x.detach().cpu().numpy() for arg, x in zip(session.get_inputs(), tensors)})

    diff = _max_diff(expected, run(example_inputs))
    checked = [_shapes(example_inputs)]
    file_shapes = [arg.shape for arg in session.get_inputs()]
    grown = grown_inputs(example_inputs, _kept_dims(example_inputs, dims, file_shapes))
    grown_expected = _reference(gm, grown)
    if grown_expected is not None:
        diff = max(diff, _max_diff(grown_expected, run(grown)))
        checked.append(_shapes(grown))
    _check(diff, atol, path)
    return ExportReport(path, "onnx", diff, tuple(checked))
