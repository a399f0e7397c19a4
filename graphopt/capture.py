"""Capture: an ``nn.Module`` into a ``torch.fx.GraphModule`` whose parameters stay real parameters.

Order: a plugin's ``graphopt_capture`` hook (first answer wins), then ``torch.export`` (training IR,
``strict=False``, dynamic batch dimension), then ``torch.fx.symbolic_trace``. Symbolic-trace graphs
are normalised so that ``nn.Linear``/``nn.Conv2d`` calls look as they do in the export IR
(``aten.linear``/``aten.conv2d`` on ``get_attr`` weights), so every method sees one form.
The model is deep-copied first: the user's model is never modified.

Dynamic dimensions (see :mod:`graphopt.inputs`: by default the batch dim of every tensor input and the
sequence dim of token tensors) are ``Dim.AUTO`` in ``torch.export``; the dims the graph kept dynamic are
recorded with it (``graphopt.rewrite.meta.captured_dynamic_dims``) and reused by the training step and
``graphopt.export``.

A model that neither path can capture (data-dependent Python control flow such as ``if x.sum() > 0:``)
raises :class:`~graphopt.CaptureError` naming the file and line of the offending Python code; graphopt
never trains an unrewritten model instead.
"""

from __future__ import annotations

import copy
import inspect
import os
import re
import traceback
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from graphopt.errors import CaptureError, InputError
from graphopt.inputs import CallInputs, Dims, Key, at_least_two, normalise_dynamic_dims
from graphopt.plugins import call_hook
from graphopt.progress import logger
from graphopt.rewrite.meta import set_capture_info
from graphopt.rewrite.normalise import normalise


def export_dynamic_shapes(forward: Any, inputs: CallInputs, dims: Dims, dim: Any = None) -> Any:
    """``torch.export``'s ``dynamic_shapes`` for calling ``forward`` with ``inputs``: each dynamic dim
    ``Dim.AUTO`` (or ``dim(key, d)``). Positional-only calls get a tuple; calls with keywords a dict by
    ``forward``'s parameter names (bound from its signature, ``*args`` / ``**kwargs`` parameters included)."""
    def spec(key: Key) -> dict[int, Any] | None:
        if key not in dims:
            return None
        return {d: torch.export.Dim.AUTO if dim is None else dim(key, d) for d in dims[key]}

    if not inputs.kwargs:
        return tuple(spec(i) for i in range(len(inputs.args)))
    signature = inspect.signature(forward)
    bound = signature.bind(*inputs.args, **inputs.kwargs)
    keys = {id(value): key for key, value in inputs.items()}
    shapes: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(spec(keys[id(v)]) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: spec(k) for k in value}
        else:
            shapes[name] = spec(keys[id(value)])
    return shapes


def bound_tensors(forward: Any, inputs: CallInputs) -> list[tuple[Key, torch.Tensor]]:
    """The tensor inputs in the order of ``forward``'s parameters (the order an exported file takes them)."""
    keys = {id(value): key for key, value in inputs.items()}
    bound = inspect.signature(forward).bind(*inputs.args, **inputs.kwargs)
    values = pytree.tree_leaves(dict(bound.arguments))
    return [(keys[id(v)], v) for v in values if isinstance(v, torch.Tensor) and id(v) in keys]


def kept_dynamic(gm: torch.fx.GraphModule, inputs: CallInputs, dims: Dims) -> Dims:
    """The requested ``dims`` the captured graph kept symbolic (a model may specialise one, e.g. a fixed
    sequence length): read from the shapes of its input placeholders."""
    placeholders = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    tensors = [v for v in placeholders if isinstance(v, torch.Tensor)]
    keys = [key for key, _ in bound_tensors(gm.forward, inputs)]
    if len(tensors) != len(keys):  # a graph without per-input placeholder metadata: trust the request
        return dict(dims)
    kept: Dims = {}
    for key, fake in zip(keys, tensors):
        symbolic = tuple(d for d in dims.get(key, ()) if not isinstance(fake.shape[d], int))
        if symbolic:
            kept[key] = symbolic
    return kept


def capture(model: nn.Module, inputs: CallInputs | tuple[Any, ...], dims: Dims | None = None) -> torch.fx.GraphModule:
    """A deep copy of ``model`` as a GraphModule; ``graphopt.rewrite.meta.capture_path(gm)`` says which path
    worked and ``captured_dynamic_dims(gm)`` which dims stayed dynamic.

    ``inputs``: a ``CallInputs`` or a tuple of positional inputs. ``dims``: the dynamic dims (default: those of
    ``graphopt.inputs``). A dynamic dim of size 1 in the example is captured from an example grown to 2
    along it (``torch.export`` would specialise it to 1).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"graphopt captures torch.nn.Module objects, got {type(model).__name__}")
    inputs = inputs if isinstance(inputs, CallInputs) else CallInputs(tuple(inputs))
    dims = normalise_dynamic_dims(inputs, None) if dims is None else dims
    try:
        inspect.signature(model.forward).bind(*inputs.args, **inputs.kwargs)
    except TypeError as err:
        raise InputError(f"{type(model).__name__}.forward does not take the inputs {inputs.describe()}: {err}") from err
    model = copy.deepcopy(model)
    hooked = call_hook("graphopt_capture", first_result=True, model=model, example_inputs=inputs.args)
    if hooked is not None:
        set_capture_info(hooked, "plugin", dims)
        return hooked
    example = at_least_two(inputs, dims)
    try:
        exported = torch.export.export(model, example.args, example.kwargs or None, strict=False,
                                       dynamic_shapes=export_dynamic_shapes(model.forward, example, dims))
        gm = exported.module()
        normalise(gm)
        kept = kept_dynamic(gm, inputs, dims)
        for key, wanted in dims.items():
            lost = [d for d in wanted if d not in kept.get(key, ())]
            if lost:
                logger.info("capture: dim %s of input %r is static: the model specialises it", lost, key)
        set_capture_info(gm, "torch.export", kept)
        check_eval_mode(model, gm, inputs)
        return gm
    except Exception as export_error:
        _check_model_runs(model, inputs)
        try:
            gm = torch.fx.symbolic_trace(model)
        except Exception as trace_error:
            where = user_code_location(export_error) or user_code_location(trace_error)
            at = f"  offending code: {where}\n" if where else ""
            raise CaptureError(
                f"cannot capture {type(model).__name__}:\n{at}"
                f"  torch.export (strict=False) failed: {type(export_error).__name__}: {_first_line(export_error)}\n"
                f"  torch.fx.symbolic_trace failed: {type(trace_error).__name__}: {_first_line(trace_error)}\n"
                "Train it through torch.compile instead: graphopt.compile(..., capture='dynamo') (graph breaks "
                "allowed; see graphopt.dynamo for the methods that work there), or make the forward traceable (no "
                "data-dependent Python control flow: use torch.where / torch.cond instead of `if tensor:`) or "
                "register a graphopt_capture plugin."
            ) from trace_error
        normalise_module_calls(gm)
        normalise(gm)
        set_capture_info(gm, "symbolic_trace", dims, f"{type(export_error).__name__}: {_first_line(export_error)}")
        return gm


def _check_model_runs(model: nn.Module, inputs: CallInputs) -> None:
    """An ``InputError`` when the model itself raises on the example inputs (after ``torch.export`` failed):
    no capture path can succeed, and the model's own error is the one to show."""
    try:
        with torch.no_grad(), torch.random.fork_rng():
            model(*inputs.args, **inputs.kwargs)
    except Exception as err:
        where = user_code_location(err)
        at = f" at {where}" if where else ""
        raise InputError(f"cannot capture {type(model).__name__}: the model itself raises on the example inputs "
                         f"{inputs.describe()}{at}: {type(err).__name__}: {_first_line(err)}; pass example inputs "
                         "the model accepts (dtype, shape, device)") from err


def check_eval_mode(model: nn.Module, gm: torch.fx.GraphModule, inputs: CallInputs) -> None:
    """Warn when the graph's inference form (``graphopt.rewrite.modes``) does not reproduce ``model.eval()`` on
    the example: the model then has a ``self.training`` branch graphopt cannot switch, and ``m.eval()``
    would not equal the model's own eval mode."""
    from graphopt.rewrite.modes import inference_graph

    with torch.no_grad(), torch.random.fork_rng():
        try:
            model.eval()
            expected = model(*inputs.args, **inputs.kwargs)
        finally:
            model.train()
        actual = inference_graph(gm)(*inputs.args, **inputs.kwargs)
    pairs = list(zip(*(pytree.tree_leaves(x) for x in (expected, actual))))
    # relative to each output's own scale: a random-init model's outputs can be ~1e-26 (MobileNetV2's logits)
    diffs = [(e.double() - a.double()).abs().max().item() / max(e.double().abs().max().item(), 1e-300)
             for e, a in pairs if isinstance(e, torch.Tensor) and isinstance(a, torch.Tensor) and e.numel()]
    if diffs and max(diffs) > 1e-4:
        logger.warning("capture: the inference graph differs from %s.eval() by %.3g (relative) on the example "
                       "inputs: the model has a `self.training` branch graphopt cannot switch in the graph, so "
                       "m.eval() will not equal its eval mode", type(model).__name__, max(diffs))


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
