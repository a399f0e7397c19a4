"""Export: the rewritten model in inference form to ``.onnx``, ``.pt2`` or ``.py`` (format from the suffix).

Files are written all or nothing (:mod:`graphopt.staged_write`): a file that fails its check never reaches
``path``, and a file already there stays as it was. With ``merge=True`` the methods' export passes fold
their nodes into plain weights first, so the file holds a plain model; with ``merge=False`` they leave their
compact form (``CompiledModel.export_graph``). Every file is checked: ONNX with ``onnx.checker`` and
onnxruntime against PyTorch, ``.pt2`` by loading it back and running it: every output element must satisfy
``|file - PyTorch| <= atol + rtol * |PyTorch|`` (``numpy.allclose``'s rule; default atol 1e-4, rtol 1e-4:
onnxruntime's float32 kernels sum in another order than PyTorch's, and the difference grows with the
magnitude of the output, 1.3e-4 on MobileNetV2's logits of 12 in merged and unmerged files alike).
ONNX files are written by the first exporter path that works (``graphopt.export_fallbacks``: dynamo, dynamo
with contiguous views, TorchScript); the report names it.
The batch dimension (dim 0 of every tensor input) is dynamic in ``.onnx`` and ``.pt2``; more dynamic
dims (a sequence length) come from ``graphopt.compile(..., dynamic_dims=...)`` (kept with the captured
graph) or from ``export(..., dynamic_dims=...)`` (same format: one entry per positional input, dim
indices or None). The files are checked on the example inputs and again on inputs grown by one along
every dim the file kept dynamic (rows repeated, so token ids stay valid), so a dim the exporter
specialised shows up as a static dim in the file, never as wrong numbers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from graphopt.capture import bound_tensors, export_dynamic_shapes, kept_dynamic
from graphopt.errors import ExportError
from graphopt.export_fallbacks import export_onnx_file
from graphopt.inputs import CallInputs, Dims, DynamicDims, grown, normalise_dynamic_dims
from graphopt.staged_write import staged_write

FORMATS = (".onnx", ".pt2", ".py")


@dataclass(frozen=True)
class ExportReport:
    """What ``export`` wrote and how closely the file reproduces the PyTorch model."""

    path: Path
    format: str
    max_abs_diff: float | None
    checked_shapes: tuple[tuple[tuple[int, ...] | None, ...], ...] = ()  # input shapes the file was run on
    exporter: str | None = None  # ONNX: the exporter path that wrote the file (graphopt.export_fallbacks)

    def __str__(self) -> str:
        diff = "" if self.max_abs_diff is None else f", max |Δ| vs PyTorch = {self.max_abs_diff:.3g}"
        by = f", by the {self.exporter} exporter" if self.exporter else ""
        return f"wrote {self.path} ({self.format}{diff}{by})"


def export(model: Any, path: str | os.PathLike[str],
           example_inputs: tuple[Any, ...] | Mapping[str, Any] | None = None,
           merge: bool = True, atol: float = 1e-4, rtol: float = 1e-4,
           dynamic_dims: DynamicDims | None = None) -> ExportReport:
    """Write ``model`` (a compiled model) to ``path``; ``.onnx``/``.pt2`` are checked against PyTorch.

    ``example_inputs``: positional (a tuple) or keyword (a dict) inputs to export with (default: the ones
    the model was captured with). ``dynamic_dims``: the input dims kept dynamic (default: those the model
    was captured with; see ``graphopt.inputs``). ``atol``, ``rtol``: the file's outputs must be within
    ``atol + rtol * |expected|`` of PyTorch's, element by element.
    """
    path = Path(path)
    if path.suffix not in FORMATS:
        raise ExportError(f"cannot export to {path.name!r}: use a path ending in one of {', '.join(FORMATS)}")
    for name, value in (("atol", atol), ("rtol", rtol)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise ExportError(f"{name}={value!r} is invalid; use a finite number >= 0 (the written file's outputs "
                              "must be within atol + rtol * |PyTorch's| of PyTorch's)")
    tolerance = Tolerance(atol, rtol)
    captured = model.captured
    if example_inputs is None:
        inputs = captured.example
    elif isinstance(example_inputs, Mapping):
        inputs = CallInputs((), dict(example_inputs))
    else:
        inputs = CallInputs(tuple(example_inputs))
    dims = captured.dims if dynamic_dims is None else normalise_dynamic_dims(inputs, dynamic_dims)
    gm = captured.export_graph(merge)
    with torch.no_grad():
        expected = gm(*inputs.args, **inputs.kwargs)
    with staged_write(path) as staged:  # written and checked beside the target, then renamed over it
        if path.suffix == ".py":
            staged.write_text(_python_source(gm, model, merge))
            report = ExportReport(staged, "fx-python", None)
        elif path.suffix == ".pt2":
            report = _export_pt2(gm, staged, inputs, expected, tolerance, dims)
        else:
            report = _export_onnx(gm, staged, inputs, expected, tolerance, captured.onnx_translations(), dims)
    return replace(report, path=path)


def _python_source(gm: torch.fx.GraphModule, model: Any, merge: bool) -> str:
    specs = ", ".join(m.spec() for m in model.methods)
    header = (f"# FX code of {model.model_name} rewritten by graphopt [{specs}], merge={merge}\n"
              f"# parameters: {sum(p.numel() for p in gm.parameters())}\n")
    return header + gm.print_readable(print_output=False)


@dataclass(frozen=True)
class Tolerance:
    """How far an exported file's outputs may be from PyTorch's: ``|file - PyTorch| <= atol + rtol * |PyTorch|``."""

    atol: float
    rtol: float


@dataclass(frozen=True)
class Comparison:
    """The file's outputs against PyTorch's: the largest absolute difference, and the largest excess over the
    tolerance (``|file - PyTorch| - rtol * |PyTorch|``, compared with ``atol``)."""

    max_abs_diff: float
    max_excess: float

    def worst(self, other: Comparison) -> Comparison:
        return Comparison(max(self.max_abs_diff, other.max_abs_diff), max(self.max_excess, other.max_excess))


def _compare(expected: Any, actual: Any, tolerance: Tolerance) -> Comparison:
    exp_leaves = [x for x in pytree.tree_leaves(expected) if isinstance(x, torch.Tensor)]
    act_leaves = [torch.as_tensor(x) for x in pytree.tree_leaves(actual)]
    if len(exp_leaves) != len(act_leaves):
        raise ExportError(f"the exported file returns {len(act_leaves)} outputs, PyTorch returns {len(exp_leaves)}")
    result = Comparison(0.0, -math.inf)
    for e, a in zip(exp_leaves, act_leaves):
        if e.numel():
            e, a = e.detach().cpu().double(), a.double()
            diff = (e - a).abs()
            result = result.worst(Comparison(diff.max().item(), (diff - tolerance.rtol * e.abs()).max().item()))
    return result


def _check(comparison: Comparison, tolerance: Tolerance, path: Path) -> None:
    if not comparison.max_excess <= tolerance.atol:  # also catches NaN
        raise ExportError(f"the exported {path.name} differs from the PyTorch model by {comparison.max_abs_diff:.3g} "
                          f"(> atol={tolerance.atol:g} + rtol={tolerance.rtol:g} * |output|); nothing was written; "
                          "export(..., atol=..., rtol=...) takes a larger bound")


def _shapes(inputs: CallInputs) -> tuple[tuple[int, ...] | None, ...]:
    return tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else None for _, x in inputs.items())


def _reference(gm: torch.fx.GraphModule, inputs: CallInputs | None) -> Any:
    """PyTorch's output on ``inputs``; None when there are none or the model itself rejects them (a model
    may constrain a dim, e.g. an even batch): then the file is checked on the example inputs only."""
    if inputs is None:
        return None
    try:
        with torch.no_grad():
            return gm(*inputs.args, **inputs.kwargs)
    except Exception:
        return None


def _export_pt2(gm: torch.fx.GraphModule, path: Path, inputs: CallInputs, expected: Any, tolerance: Tolerance,
                dims: Dims) -> ExportReport:
    program = torch.export.export(gm, inputs.args, inputs.kwargs or None, strict=False,
                                  dynamic_shapes=export_dynamic_shapes(gm.forward, inputs, dims))
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    with torch.no_grad():
        reloaded = loaded(*inputs.args, **inputs.kwargs)
    comparison = _compare(expected, reloaded, tolerance)
    checked = [_shapes(inputs)]
    kept = kept_dynamic(loaded, inputs, dims)
    more = grown(inputs, kept) if kept else None
    more_expected = _reference(gm, more)
    if more_expected is not None:
        with torch.no_grad():
            comparison = comparison.worst(_compare(more_expected, loaded(*more.args, **more.kwargs), tolerance))
        checked.append(_shapes(more))
    _check(comparison, tolerance, path)
    return ExportReport(path, "pt2", comparison.max_abs_diff, tuple(checked))


def _export_onnx(gm: torch.fx.GraphModule, path: Path, inputs: CallInputs, expected: Any, tolerance: Tolerance,
                 translations: dict[Any, Any], dims: Dims) -> ExportReport:
    import onnx
    import onnxruntime

    batch = torch.export.Dim("batch")  # one name for every input's dim 0; other dims are inferred (AUTO)
    dynamic = export_dynamic_shapes(gm.forward, inputs, dims,
                                    lambda key, d: batch if d == 0 else torch.export.Dim.AUTO)
    exporter = export_onnx_file(gm, path, inputs, dynamic, translations, dims)
    onnx.checker.check_model(str(path))
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:
        dtypes = {x.dtype for _, x in inputs.items() if isinstance(x, torch.Tensor)}
        hint = "; onnxruntime lacks many float64 kernels: export a float32 model" if torch.float64 in dtypes else ""
        raise ExportError(f"onnxruntime cannot load the exported {path.name} (nothing was written): {err}"
                          f"{hint}") from err

    def run(call: CallInputs) -> list[Any]:
        tensors = [x for _, x in bound_tensors(gm.forward, call)]
        return session.run(None, {arg.name: x.detach().cpu().numpy() for arg, x in zip(session.get_inputs(), tensors)})

    comparison = _compare(expected, run(inputs), tolerance)
    checked = [_shapes(inputs)]
    keys = [key for key, _ in bound_tensors(gm.forward, inputs)]
    kept = {key: tuple(d for d in dims.get(key, ()) if not isinstance(arg.shape[d], int))
            for key, arg in zip(keys, session.get_inputs())}
    kept = {k: v for k, v in kept.items() if v}
    more = grown(inputs, kept) if kept else None
    more_expected = _reference(gm, more)
    if more_expected is not None:
        comparison = comparison.worst(_compare(more_expected, run(more), tolerance))
        checked.append(_shapes(more))
    _check(comparison, tolerance, path)
    return ExportReport(path, "onnx", comparison.max_abs_diff, tuple(checked), exporter)
