"""A model after capture: its forward graph, what the methods contributed, and the forms built from them.

:class:`CapturedModel` is what a compiled model holds once it has been captured and every method applied:
the rewritten forward graph, the methods' contexts and :class:`~graphopt.contributions.Contributions`, the
training step, and the inference and export forms of the graph (each built on first use and rebuilt after
:meth:`graph_changed`). Method code is reached only through :func:`graphopt.dispatch.dispatch`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from graphopt.contributions import Contributions
from graphopt.dispatch import EXPORT, FUNCTION, INFERENCE, STATE, dispatch
from graphopt.inputs import CallInputs, Dims, check_call
from graphopt.quiet import quiet_torch_internals
from graphopt.rewrite.adapters import drop_unused_parameters
from graphopt.rewrite.modes import inference_graph
from graphopt.train.checkpoint import Layout, LoadReport, Spec, apply_checkpoint, read_checkpoint
from graphopt.train.state import TrainState
from graphopt.train.tracing import compile_graph, mark_dynamic
from graphopt.uninterrupted import uninterrupted

if TYPE_CHECKING:
    from graphopt.context import MethodContext
    from graphopt.distributed import Replicas
    from graphopt.train.step import TrainingStep


class CapturedModel:
    """The captured forward graph ``gm`` with its contributions, training step and inference form."""

    def __init__(self, gm: torch.fx.GraphModule, example: CallInputs, dims: Dims, train_state: TrainState,
                 reserved_names: frozenset[str] = frozenset()) -> None:
        self.gm = gm
        self.example = example  # copies of the inputs it was captured with
        self.dims = dims  # the dynamic dims the captured graph kept
        self.train_state = train_state
        self.reserved_names = reserved_names  # attributes of the compiled model a method may not add
        self.contributions = Contributions()
        self.contexts: list[MethodContext] = []
        self.trainer: TrainingStep | None = None
        self.parallel: Replicas | None = None  # data parallel training (graphopt.distributed)
        self.compiles = 0  # backend compiles of the forward, inference and training-step graphs
        self._inference: torch.fx.GraphModule | None = None
        self._compiled_forward: dict[int, Callable[..., Any]] = {}

    # -- changes ----------------------------------------------------------------------------------------
    def graph_changed(self) -> None:
        """The forward graph or its parameters changed: check it, forget every form built from it."""
        self.gm.graph.lint()
        self.gm.recompile()
        self._inference = None
        self._compiled_forward.clear()
        if self.trainer is not None:
            self.trainer.invalidate()

    def count_compile(self) -> None:
        self.compiles += 1

    def map_slots(self, name: str, old_shape: tuple[int, ...] | None,
                  fn: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        """Optimizer slots of parameter ``name`` after it changed: those of ``old_shape`` mapped by ``fn``
        (others, like a step count, kept); without ``fn`` the parameter's state is dropped."""
        slots = self.train_state.slots.get(name)
        if slots is None:
            return
        if fn is None:
            del self.train_state.slots[name]
            return
        self.train_state.slots[name] = {k: fn(v) if tuple(v.shape) == old_shape else v for k, v in slots.items()}

    # -- forward, inference, export -----------------------------------------------------------------------
    def inference_module(self) -> torch.fx.GraphModule:
        """The forward graph in inference mode (dropout off, batch norm on running statistics), after every
        method's inference passes; it shares the forward graph's parameters."""
        if self._inference is None:
            inference = inference_graph(self.gm)
            for entry in self.contributions.inference_passes:
                dispatch(entry.ctx, INFERENCE, "inference pass", entry.fn, inference)
            inference.graph.lint()
            inference.recompile()
            inference.training = False  # the flag only: an exported GraphModule refuses .eval()
            self._inference = inference
        return self._inference

    def check_call(self, inputs: CallInputs) -> None:
        """An ``InputError`` unless ``inputs`` fit the captured signature (see ``graphopt.inputs.check_call``)."""
        check_call(self.example, self.dims, inputs)

    def forward(self, training: bool, backend: str, inputs: CallInputs) -> Any:
        """Run the training-mode forward graph or the inference graph on ``inputs`` (checked against the
        captured signature), compiled unless ``backend="eager"``."""
        self.check_call(inputs)
        module = self.gm if training else self.inference_module()
        with self._full_parameters(call=True):
            if backend == "eager":
                return module(*inputs.args, **inputs.kwargs)
            compiled = self._compiled_forward.get(id(module))
            if compiled is None:
                what = "forward (training mode)" if training else "forward (inference)"
                compiled = self._compiled_forward[id(module)] = compile_graph(module, backend, what,
                                                                              self.count_compile)
            mark_dynamic(inputs, self.dims)
            return compiled(*inputs.args, **inputs.kwargs)

    def _full_parameters(self, call: bool = False) -> Any:
        """A context in which the graph holds full parameters (with ``sharding="full"`` they are gathered)."""
        return contextlib.nullcontext() if self.parallel is None else self.parallel.full_parameters(self.gm, call)

    def export_graph(self, merge: bool) -> torch.fx.GraphModule:
        """A deep copy of the inference graph after every method's export passes of this ``merge``:
        ``True``, adapters folded into plain weights; ``False``, their compact form. Unused parameters go."""
        with quiet_torch_internals(), self._full_parameters():
            gm = copy.deepcopy(self.inference_module())
        for entry in self.contributions.export_passes[bool(merge)]:
            dispatch(entry.ctx, EXPORT, f"export pass, merge={bool(merge)}", entry.fn, gm)
        gm.graph.eliminate_dead_code()
        drop_unused_parameters(gm)
        gm.delete_all_unused_submodules()
        gm.recompile()
        return gm

    def onnx_translations(self) -> dict[Any, Callable[..., Any]]:
        """The methods' ONNX translations of their custom ops, each called through the dispatcher."""
        return {op: _dispatched(entry.ctx, EXPORT, f"ONNX translation of {op}", entry.fn)
                for op, entry in self.contributions.onnx_translations.items()}

    # -- method state ---------------------------------------------------------------------------------------
    def method_states(self) -> dict[str, dict[str, Any]]:
        """Every method's saved state, by method name."""
        states: dict[str, dict[str, Any]] = {}
        for entry in self.contributions.states:
            saved = dispatch(entry.ctx, STATE, "state save", entry.save)
            states.setdefault(entry.ctx.method.name, {}).update(saved)
        return states

    def stateful_methods(self) -> set[str]:
        return {entry.ctx.method.name for entry in self.contributions.states}

    def checkpoint_layout(self, accumulation_steps: int = 1, scaled: bool = False) -> Layout:
        """What a state dict must fit (``graphopt.train.checkpoint``): the graph's tensors as the methods' state
        will shape them, the trainable parameters and the optimizer's slots of each."""
        base = {k: (tuple(v.shape), v.dtype) for k, v in self.gm.state_dict().items()}
        if self.parallel is not None:  # a sharded model's checkpoint is unsharded: full shapes
            base.update({k: (shape, base[k][1]) for k, shape in self.parallel.full_shapes().items() if k in base})

        def tensors(method_states: Mapping[str, Mapping[str, Any]]) -> dict[str, Spec]:
            expected = dict(base)
            for entry in self.contributions.states:
                name = entry.ctx.method.name
                if entry.shapes is not None and name in method_states:
                    shapes = dispatch(entry.ctx, STATE, "state shapes", entry.shapes, method_states[name])
                    for key, shape in shapes.items():
                        if shape is None:
                            expected.pop(key, None)
                        else:
                            expected[key] = (tuple(shape), base[key][1])
            return expected

        slots = None
        if self.contributions.optimizer is not None:
            opt_ctx, optimizer = self.contributions.optimizer

            def slots(name: str, spec: Spec) -> dict[str, Spec]:
                shape, dtype = spec
                fresh = dispatch(opt_ctx, STATE, f"state of {name!r}", optimizer.state_for, name,
                                 torch.empty(shape, dtype=dtype, device="meta"))
                return {k: (tuple(v.shape), v.dtype) for k, v in fresh.items()}

        trainable = [n for n, p in self.gm.named_parameters() if p.requires_grad]
        return Layout(tensors, trainable, slots, sorted(self.stateful_methods()), accumulation_steps, scaled,
                      self.train_state.lr)

    def load_checkpoint(self, state: Mapping[str, Any], strict: bool = True, accumulation_steps: int = 1,
                        scaled: bool = False) -> LoadReport:
        """Check ``state`` completely against this model (``graphopt.train.checkpoint``), then load it: the
        methods' own state first (which may resize their parameters), then the tensors and training state."""
        checkpoint = read_checkpoint(state, self.checkpoint_layout(accumulation_steps, scaled), strict)
        if self.parallel is not None:  # the unsharded checkpoint cut to this rank's rows
            module, slots = self.parallel.sharded(checkpoint.module, checkpoint.slots)
            checkpoint = dataclasses.replace(checkpoint, module=module, slots=slots)
        loading = [e for e in self.contributions.states if e.ctx.method.name in checkpoint.methods]
        before = [(e, dispatch(e.ctx, STATE, "state save", e.save)) for e in loading]
        with uninterrupted():  # a Ctrl-C lands before or after the load, never halfway
            loaded = 0
            try:
                for entry in loading:
                    loaded += 1
                    dispatch(entry.ctx, STATE, "state load", entry.load, checkpoint.methods[entry.ctx.method.name])
            except BaseException:
                *done, failed = before[:loaded]
                for entry, saved in done:  # every method loaded before the failure back as it was
                    entry.load(saved)
                with contextlib.suppress(Exception):  # the failing one too, if its load can run at all
                    failed[0].load(failed[1])
                raise
            apply_checkpoint(checkpoint, self.gm, self.train_state, strict)
        return checkpoint.report

    def descriptions(self) -> dict[str, str]:
        """What each method recorded about itself, by method name."""
        texts: dict[str, list[str]] = {}
        for ctx, text in self.contributions.descriptions:
            texts.setdefault(ctx.method.name, []).append(text)
        return {name: "\n".join(parts) for name, parts in texts.items()}

    def model_function(self, name: str) -> Callable[..., Any] | None:
        """The function a method added as ``m.<name>``, called through the dispatcher (None if there is none)."""
        entry = self.contributions.functions.get(name)
        return None if entry is None else _dispatched(entry.ctx, FUNCTION, f"model function {name!r}", entry.fn)


def _dispatched(ctx: MethodContext, phase: str, what: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        return dispatch(ctx, phase, what, fn, *args, **kwargs)

    return call
