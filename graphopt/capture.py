"""Capture: an ``nn.Module`` into a ``torch.fx.GraphModule`` whose parameters stay real parameters.

Order: a plugin's ``graphopt_capture`` hook (first answer wins), then ``torch.export`` (training IR,
``strict=False``, dynamic batch dimension), then ``torch.fx.symbolic_trace``. Symbolic-trace graphs
are normalised so that ``nn.Linear``/``nn.Conv2d`` calls look as they do in the export IR
(``aten.linear``/``aten.conv2d`` on ``get_attr`` weights), so every method sees one form.
The model is deep-copied first: the user's model is never modified.

Dynamic dimensions: by default dim 0 (batch) of every tensor input is dynamic. ``dynamic_dims`` marks
others, one entry per positional input: a sequence of dim indices (negative counts from the end) or
None for an input whose shape is static, e.g. ``dynamic_dims=[(0, 1)]`` for token ids ``(batch, seq)``.
The choice is kept with the graph (``graphopt.rewrite.meta.captured_dynamic_dims``) and reused by
``graphopt.export``.

A model that neither path can capture (data-dependent Python control flow such as ``if x.sum() > 0:``)
raises :class:`~graphopt.CaptureError` naming the file and line of the offending Python code; graphopt
never trains an unrewritten model instead.
"""

from __future__ import annotations

import copy
import os
import re
import traceback
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from graphopt.errors import CaptureError, OptionError
from graphopt.plugins import get_plugin_manager
from graphopt.rewrite.meta import set_capture_info

DynamicDims = Sequence[Sequence[int] | None]


def normalise_dynamic_dims(example_inputs: tuple[Any, ...],
                           dynamic_dims: DynamicDims | None) -> tuple[tuple[int, ...] | None, ...]:
    """Per input, the sorted non-negative dims that are dynamic (None: static or not a tensor).

    ``dynamic_dims=None`` means dim 0 of every tensor input with at least one dim. Otherwise one entry
    per positional input: a sequence of dim indices (negative ones count from the end) or None.
    Anything else is an ``OptionError`` saying what is allowed.
    """
    if dynamic_dims is None:
        return tuple((0,) if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in example_inputs)
    allowed = ("use one entry per positional input: a sequence of dim indices, e.g. dynamic_dims=[(0, 1)] for "
               "(batch, seq) token ids, or None for a static input")
    if isinstance(dynamic_dims, (str, bytes)) or not isinstance(dynamic_dims, Sequence):
        raise OptionError(f"dynamic_dims={dynamic_dims!r} is invalid; {allowed}")
    if len(dynamic_dims) != len(example_inputs):
        raise OptionError(f"dynamic_dims={dynamic_dims!r} has {len(dynamic_dims)} entries for "
                          f"{len(example_inputs)} inputs; {allowed}")
    result: list[tuple[int, ...] | None] = []
    for index, (x, dims) in enumerate(zip(example_inputs, dynamic_dims)):
        if dims is None or (isinstance(x, torch.Tensor) and x.dim() == 0 and not dims):
            result.append(None)
            continue
        if not isinstance(x, torch.Tensor):
            raise OptionError(f"dynamic_dims[{index}]={dims!r}: input {index} is a {type(x).__name__}, not a "
                              f"tensor; {allowed}")
        if isinstance(dims, int) or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
            raise OptionError(f"dynamic_dims[{index}]={dims!r} is invalid; {allowed}")
        bad = [d for d in dims if not -x.dim() <= d < x.dim()]
        if bad:
            raise OptionError(f"dynamic_dims[{index}]={dims!r}: dim {bad[0]} is out of range for input {index} "
                              f"of shape {tuple(x.shape)}; {allowed}")
        result.append(tuple(sorted({d % x.dim() for d in dims})) or None)
    return tuple(result)


def dynamic_shapes(example_inputs: tuple[Any, ...], dynamic_dims: DynamicDims | None) -> tuple[Any, ...]:
    """``torch.export`` ``dynamic_shapes`` for ``example_inputs``: ``Dim.AUTO`` on the dims of ``dynamic_dims``."""
    normalised = normalise_dynamic_dims(example_inputs, dynamic_dims)
    return tuple(None if dims is None else dict.fromkeys(dims, torch.export.Dim.AUTO) for dims in normalised)


def capture(model: nn.Module, example_inputs: tuple[Any, ...],
            dynamic_dims: DynamicDims | None = None) -> torch.fx.GraphModule:
    """A deep copy of ``model`` as a GraphModule; ``graphopt.rewrite.meta.capture_path(gm)`` says which path worked.

    ``dynamic_dims``: see the module docstring (default: the batch dim of every tensor input).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"graphopt captures torch.nn.Module objects, got {type(model).__name__}")
    dims = normalise_dynamic_dims(example_inputs, dynamic_dims)
    model = copy.deepcopy(model)
    hooked = get_plugin_manager().hook.graphopt_capture(model=model, example_inputs=example_inputs)
    if hooked is not None:
        set_capture_info(hooked, "plugin", dims)
        return hooked
    try:
        exported = torch.export.export(
            model, example_inputs, strict=False, dynamic_shapes=dynamic_shapes(example_inputs, dims)
        )
        gm = exported.module()
        set_capture_info(gm, "torch.export", dims)
        return gm
    except Exception as export_error:
        try:
            gm = torch.fx.symbolic_trace(model)
        except Exception as trace_error:
            where = user_code_location(export_error) or user_code_location(trace_error)
            at = f"  offending code: {where}\n" if where else ""
            raise CaptureError(
                f"cannot capture {type(model).__name__}:\n{at}"
                f"  torch.export (strict=False) failed: {type(export_error).__name__}: {_first_line(export_error)}\n"
                f"  torch.fx.symbolic_trace failed: {type(trace_error).__name__}: {_first_line(trace_error)}\n"
                "Make the forward traceable (no data-dependent Python control flow: use torch.where / torch.cond "
                "instead of `if tensor:`) or register a graphopt_capture plugin."
            ) from trace_error
        normalise_module_calls(gm)
        set_capture_info(gm, "symbolic_trace", dims, f"{type(export_error).__name__}: {_first_line(export_error)}")
        return gm


_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_STDLIB_DIR = os.path.dirname(os.path.abspath(copy.__file__)) + os.sep
_GRAPHOPT_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _is_library(filename: str) -> bool:
    """Whether ``filename`` is torch, graphopt or the standard library (not model code)."""
    path = os.path.abspath(filename)
    if path.startswith((_TORCH_DIR, _GRAPHOPT_DIR)) or filename.startswith("<"):
        return True
    return path.startswith(_STDLIB_DIR) and not any(d in path for d in ("site-packages", "dist-packages"))


_RAISED_AT = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


def user_code_location(err: BaseException) -> str | None:
    """``file:line in function: code`` of the model code that made a capture path fail, if it can be found.

    torch.export names the call in its message ("The following call raised this error: File ..."); for
    other errors the innermost traceback frame outside torch, graphopt and the standard library is used.
    """
    seen: set[int] = set()
    chain: BaseException | None = err
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        matches = [m for m in _RAISED_AT.finditer(str(chain)) if not _is_library(m.group(1))]
        if matches:
            file, line, func, code = matches[-1].groups()
            return f"{file}:{line} in {func}: {code.strip()}"
        frames = [f for f in traceback.extract_tb(chain.__traceback__) if not _is_library(f.filename)]
        if frames:
            frame = frames[-1]
            return f"{frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"
        chain = chain.__cause__ or chain.__context__
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "(no message)"


def normalise_module_calls(gm: torch.fx.GraphModule) -> None:
    """Turn ``call_module`` nodes of Linear/Conv2d into ``aten.linear``/``aten.conv2d`` on ``get_attr`` weights."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if type(module) is nn.Linear:
            target, extra = torch.ops.aten.linear.default, ()
        elif type(module) is nn.Conv2d and not isinstance(module.padding, str) and module.padding_mode == "zeros":
            target = torch.ops.aten.conv2d.default
            extra = (list(module.stride), list(module.padding), list(module.dilation), module.groups)
        else:
            continue
        with graph.inserting_before(node):
            weight = graph.get_attr(f"{node.target}.weight")
            bias = graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
            call = graph.call_function(target, (node.args[0], weight, bias, *extra))
        call.meta["nn_module_stack"] = {node.target: (node.target, type(module))}
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
