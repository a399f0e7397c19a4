"""``graphopt.compile`` and the :class:`CompiledModel` it returns, a ``torch.nn.Module``.

``compile`` validates the specs and options and copies the user's model at once (later changes to the
user's model do not leak in; the user's model is never modified). The compiled model captures on first
use (or at once when ``example_inputs`` are given): capture (:mod:`graphopt.capture`), the methods applied
(:mod:`graphopt.rewrite.passes`), and the training step built lazily (:mod:`graphopt.train.step`).

As a module it *is* the rewritten model: its parameters, buffers and submodules are those of the captured
graph, under the names of the original model (adapters added as ``<path>.<method>_<name>``, frozen base
weights with ``requires_grad=False``), so ``.to()``, ``.train()``/``.eval()``, nesting in a parent module,
``parameters()`` for a torch optimizer and ``m(x)`` + ``loss.backward()`` work as for any module, and
``m.step`` is the fused fast path. Parameters exist once the model is captured.
"""

from __future__ import annotations

import copy
import functools
import inspect
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphopt.capture import capture
from graphopt.captured import CapturedModel
from graphopt.distributed import data_parallel
from graphopt.errors import CheckpointError, InputError, NotCapturedError, OptionError
from graphopt.inputs import CallInputs, DynamicDims, normalise_dynamic_dims
from graphopt.interop import adapter_state, merge, peft
from graphopt.method import Method
from graphopt.optim import Optimizer
from graphopt.plugins import call_hook
from graphopt.progress import stage
from graphopt.rewrite.meta import captured_dynamic_dims
from graphopt.rewrite.passes import apply_methods
from graphopt.signed_forward import SignedForward
from graphopt.train.checkpoint import LoadReport, build_state_dict
from graphopt.train.state import LrSchedule, TrainState
from graphopt.train.step import TrainingStep
from graphopt.train.step_function import StepOptions
from graphopt.training_options import TrainingOptions, step_inputs


@dataclass(frozen=True)
class CompileStats:
    """``traces``: training-step graphs traced so far; ``cached``: the step variant of each compiled step in
    the cache (``()`` is the full graph), least recently used first; ``compiles``: backend compiles so far
    (``torch.compile`` of the training step, the forward and the inference graph; 0 with ``backend="eager"``)."""

    traces: int
    cached: tuple[Hashable, ...]
    compiles: int = 0


class CompiledModel(nn.Module):
    """A model rewritten by graphopt methods (see the module docstring).

    ``m(*args, **kwargs)`` runs the rewritten forward (differentiable; the inference graph after ``m.eval()``);
    ``m.step(*inputs, target)`` or ``m.step(**batch)`` runs one training step (forward, loss, backward, fused
    update) and returns the detached loss. Methods may add functions (``m.prune()``) when the model is
    captured; ``dir(m)`` lists them.
    """

    accepts_loss_kwargs = False  # transformers.Trainer: pass no loss keywords the captured graph does not take

    def __init__(self, model: nn.Module, methods: list[Method], loss_fn: Callable[..., torch.Tensor] | None,
                 backend: str, dynamic_dims: DynamicDims | None, options: TrainingOptions) -> None:
        super().__init__()
        self.model_name = type(model).__name__
        self.forward_signature = inspect.signature(model.forward)  # what m.forward shows (Trainer reads it)
        self.methods = methods
        self.loss_fn = loss_fn
        self.backend = backend
        self.dynamic_dims = dynamic_dims
        self.options = options
        optimizer = next((m for m in methods if isinstance(m, Optimizer)), None)
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))  # the step generator's, from the global one
        self._train_state = TrainState(lr=optimizer.lr if optimizer is not None else None, seed=seed)
        self._pending_state: tuple[dict[str, Any], bool] | None = None
        self._captured: CapturedModel | None = None
        self._model: nn.Module | None = None
        self._stepping = threading.Lock()
        self._become(copy.deepcopy(model))  # ours from now on; replaced by the graph once captured

    def _become(self, module: nn.Module) -> None:
        """Share ``module``'s parameters, buffers and submodules: this module's state *is* its state."""
        object.__setattr__(self, "_model", module)
        for attr in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
            object.__setattr__(self, attr, getattr(module, attr))

    # -- capture ----------------------------------------------------------------------------------
    def _capture(self, inputs: CallInputs) -> CapturedModel:
        checks = inputs.detached_copy()
        dims = normalise_dynamic_dims(checks, self.dynamic_dims)
        with stage(f"capture of {self.model_name}"):
            try:
                gm = capture(self._model, checks, dims)
            except InputError as err:
                if self.loss_fn is not None:
                    raise
                raise InputError(f"{err}; without loss_fn, m.step passes every argument to the model (for a model "
                                 "that computes its own loss): give graphopt.compile(..., loss_fn=...) to pass a "
                                 "target last") from err
        captured = CapturedModel(gm, checks, captured_dynamic_dims(gm) or {}, self._train_state,
                                 frozenset(dir(type(self))))
        with stage(f"methods applied ({', '.join(m.name for m in self.methods) or 'none'})"):
            # fresh copies: whatever a method keeps on itself starts clean on every capture (a failed one too)
            apply_methods(captured, copy.deepcopy(self.methods), self.options.trainable)
        captured.parallel = data_parallel(captured, self.options)  # None, or the replicas' plan (graphopt.distributed)
        device = next((p.device.type for p in gm.parameters()), "cpu")
        step_options = StepOptions(accumulation_steps=self.options.gradient_accumulation_steps,
                                   precision=self.options.precision, guarded=self.options.guarded,
                                   device_type=device)
        captured.trainer = TrainingStep(captured, self.loss_fn, self.backend, step_options,
                                        self.options.on_nonfinite, self.options.checkpoint_blocks)
        if self._pending_state is not None:
            self._load(captured, *self._pending_state)
        self._structure = merge.original_structure(self._model)  # no data: for merged_module and adapter names
        self._captured, self._pending_state = captured, None
        self._become(gm)
        self.train(self.training)
        return captured

    def _ensure_captured(self, inputs: CallInputs) -> CapturedModel:
        return self._captured if self._captured is not None else self._capture(inputs)

    @property
    def captured(self) -> CapturedModel:
        """The captured model (forward graph, contributions, training step); raises before the first call."""
        if self._captured is None:
            raise NotCapturedError("the model is captured on first call: call it once (m(x) or m.step(...)) or "
                                   "pass example_inputs= to graphopt.compile")
        return self._captured

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        """The rewritten forward graph (a ``torch.fx.GraphModule``)."""
        return self.captured.gm

    def inference_module(self) -> torch.fx.GraphModule:
        """The rewritten graph in inference mode (dropout off, batch norm on running statistics)."""
        return self.captured.inference_module()

    def export_graph(self, merge: bool = True) -> torch.fx.GraphModule:
        """The graph ``graphopt.export`` writes: the inference graph with adapters folded (``merge=True``)
        or in their compact form (``merge=False``); a copy, so changing it changes nothing here."""
        return self.captured.export_graph(merge)

    # -- forward and training ---------------------------------------------------------------------
    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        """The rewritten forward (the training-mode graph, or the inference graph after ``m.eval()``)."""
        inputs = CallInputs(args, kwargs)
        return self._ensure_captured(inputs).forward(self.training, self.backend, inputs)

    forward = SignedForward(_forward)

    def step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """One training step; returns the loss. ``m.step(*inputs, target)``: the last positional argument is
        the target of ``loss_fn``; ``m.step(**batch)``: ``labels`` is the target when ``loss_fn`` is given,
        else an input of a model that computes its own loss (``output.loss``)."""
        inputs, target = step_inputs(args, kwargs, self.loss_fn is not None)
        with self._stepping:  # one step at a time: concurrent calls from threads are serialised
            captured = self._ensure_captured(inputs)
            loss = captured.trainer(inputs, target)
            step = self._train_state.step
        call_hook("graphopt_step_end", f" after step {step} was applied", model=self, step=step, loss=loss)
        return loss

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because their loss or a gradient was not finite (``on_nonfinite="skip"``)."""
        return self._train_state.skipped

    @property
    def lr(self) -> float | None:
        """The learning rate the next step uses (the last scheduled one with a schedule)."""
        return self._train_state.lr

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of the fused optimizer (a graph input: nothing recompiles)."""
        self._train_state.set_lr(lr)

    def set_lr_schedule(self, schedule: LrSchedule | None) -> None:
        """Before each step, ``lr = schedule(step)`` (1-based step; nothing recompiles); ``None`` removes the
        schedule and keeps the last lr. See ``graphopt.optim.cosine_with_warmup``."""
        if self._train_state.lr is None:
            raise OptionError("set_lr_schedule needs an optimizer method")
        self._train_state.set_lr_schedule(schedule)

    @property
    def step_count(self) -> int:
        """Optimizer steps done (with gradient accumulation: updates, not micro-batches)."""
        return self._train_state.step

    def compile_stats(self) -> CompileStats:
        """How many training-step graphs were traced, and which step variants are compiled now."""
        trainer = self.captured.trainer
        return CompileStats(trainer.traces, tuple(trainer.cached_variants()), self.captured.compiles)

    def training_graphs(self) -> list[torch.fx.GraphModule]:
        """The traced training-step graphs (forward, loss, backward and update as one aten graph) compiled now,
        least recently used first: to read what runs in a step."""
        return self.captured.trainer.traced_graphs()

    # -- nn.Module behaviour ------------------------------------------------------------------------
    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        """Every parameter of the rewritten model (frozen base weights with ``requires_grad=False``)."""
        self.captured  # noqa: B018 - parameters exist once captured (adapters are added then)
        return super().named_parameters(prefix, recurse, remove_duplicate)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters that train (``requires_grad``), by name: the adapters when any were added."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._captured is not None:
            super().zero_grad(set_to_none)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> CompiledModel:
        """``.to()``, ``.double()``, ...: the model, the fused optimizer's state of a parameter's shape and the
        captured example inputs (what later calls are checked against); compiled graphs are rebuilt."""
        super()._apply(fn, recurse)
        slots = self._train_state.slots
        if self._captured is not None:
            shapes = {n: p.shape for n, p in self._captured.gm.named_parameters()}
            for name, state in slots.items():
                slots[name] = {k: fn(v) if v.shape == shapes.get(name) else v for k, v in state.items()}
            for name, buffer in self._train_state.accum.items():
                self._train_state.accum[name] = fn(buffer)
            captured = self._captured
            captured.example = captured.example.map(lambda _, v: fn(v) if isinstance(v, torch.Tensor) else v)
            captured.graph_changed()
        return self

    # -- state ------------------------------------------------------------------------------------
    def optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """A copy of the fused optimizer's state: ``{parameter: {slot: tensor}}`` (filled at the first step)."""
        return {n: {k: v.detach().clone() for k, v in s.items()} for n, s in self._train_state.slots.items()}

    def descriptions(self) -> dict[str, str]:
        """What each method found or did (``graphopt show`` prints it), by method name."""
        return self.captured.descriptions()

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Module tensors under their own names, plus optimizer, generator and method state under
        ``_graphopt.`` (the format is documented in ``graphopt.train.checkpoint``)."""
        if args or kwargs:
            raise TypeError("CompiledModel.state_dict() takes no arguments (a parent module's state_dict holds "
                            "this model's tensors without graphopt's own state)")
        captured = self.captured
        return build_state_dict(captured.gm, self._train_state, captured.method_states(), captured.parallel)

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True, assign: bool = False) -> LoadReport | None:
        """Load what :meth:`state_dict` returned, all or nothing: the whole state is checked first (keys, shapes,
        dtypes, this optimizer's slots, finite values) and a mismatch is a ``CheckpointError`` that changed
        nothing. ``strict=False`` leaves missing and unexpected entries out and returns them. Before capture the
        state is kept and loaded when the model is captured."""
        if self._captured is None:
            if not isinstance(state, Mapping):
                raise CheckpointError(f"load_state_dict takes the dict m.state_dict() returned, got "
                                      f"{type(state).__name__}")
            self._pending_state = (dict(state), strict)
            return None
        return self._load(self._captured, state, strict)

    def _load(self, captured: CapturedModel, state: Mapping[str, Any], strict: bool = True) -> LoadReport:
        return captured.load_checkpoint(state, strict, self.options.gradient_accumulation_steps,
                                        self.options.precision == "16-mixed")

    # -- adapters, PEFT and plain models (graphopt.interop) -------------------------------------------------
    def merged_module(self) -> nn.Module:
        """A new module of the original model's class with every adapter folded into its weights (PEFT's
        ``merge_and_unload``); checked against ``export_graph(merge=True)`` (see ``graphopt.interop.merge``)."""
        return merge.merged_module(self.export_graph(merge=True), self._structure, self.captured.example)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what the methods added (and original parameters that train), by graph name."""
        return adapter_state.adapter_state_dict(self.graph_module, self._structure.names)

    def load_adapter_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Load what :meth:`adapter_state_dict` returned (all keys known, shapes equal; all given when ``strict``)."""
        adapter_state.load_adapter_state_dict(self.graph_module, self._structure.names, state, strict)

    def save_pretrained(self, directory: str | Path, submodule: str = "") -> Path:
        """Write the adapter as a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) that
        ``peft.PeftModel.from_pretrained`` loads; ``submodule``: the path of the model PEFT wraps, if not all."""
        gm = self.graph_module
        original = self._structure.names
        trainable = [n for n, p in gm.named_parameters() if p.requires_grad and n in original]
        config = getattr(self._structure.module.get_submodule(submodule), "config", None)
        return peft.save_pretrained(directory, gm, self.methods, trainable, submodule,
                                    getattr(config, "_name_or_path", None) or None, self._structure.module)

    # -- functions methods added --------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        captured = self.__dict__.get("_captured")
        function = captured.model_function(name) if captured is not None else None
        if function is None:
            hint = "" if captured is not None or name.startswith("_") else (
                " (methods add their functions, like sora's prune, when the model is captured: call it once or "
                "pass example_inputs=)")
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}{hint}")

        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            result = function(*args, **kwargs)
            return self if result is None else result

        return call

    def __dir__(self) -> Iterable[str]:
        functions = self._captured.contributions.functions if self._captured is not None else {}
        return [*super().__dir__(), *functions]

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(f"a CompiledModel of {self.model_name} cannot be pickled or copied: its methods' "
                        "contributions are bound to this model. Save m.state_dict() (torch.save) and load it into a "
                        "model compiled again with graphopt.compile")

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return self.__reduce_ex__(2)

    def __repr__(self) -> str:
        specs = ", ".join(m.spec() for m in self.methods)
        return f"<graphopt.CompiledModel of {self.model_name} [{specs}] backend={self.backend!r}>"
