"""``graphopt.compile`` and the :class:`CompiledModel` it returns.

``compile`` validates the specs and copies the user's model at once (later changes to the user's model do
not leak in; the user's model is never modified). The compiled model captures on first use (or at once
when ``example_inputs`` are given): capture (:mod:`graphopt.capture`), the methods applied
(:mod:`graphopt.rewrite.passes`), and the training step built lazily (:mod:`graphopt.train.step`).
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphopt.capture import capture
from graphopt.captured import CapturedModel
from graphopt.distributed import broadcast_module, check_process_group, gradient_mean
from graphopt.errors import OptionError
from graphopt.interop import adapter_state, merge, peft
from graphopt.method import Method
from graphopt.optim import Optimizer
from graphopt.plugins import get_plugin_manager, method_registry
from graphopt.rewrite.passes import apply_methods
from graphopt.specs import MethodSpec, resolve_methods
from graphopt.train.checkpoint import apply_checkpoint, build_state_dict, read_checkpoint
from graphopt.train.state import LrSchedule, TrainState
from graphopt.train.step import TrainingStep

BACKENDS = ("inductor", "eager", "aot_eager")


@dataclass(frozen=True)
class CompileStats:
    """``traces``: training-step graphs traced so far; ``cached``: the step variant of each compiled step in
    the cache (``()`` is the full graph), least recently used first."""

    traces: int
    cached: tuple[Hashable, ...]


class CompiledModel:
    """A model rewritten by graphopt methods.

    ``m(x)`` runs the rewritten forward (differentiable); ``m.step(*inputs, target)`` runs one training
    step (forward, loss, backward, fused update) and returns the detached loss. Methods may add
    functions (``m.prune()``, ``m.sora_ranks()``) when the model is captured; ``dir(m)`` lists them.
    """

    def __init__(self, model: nn.Module, methods: list[Method], loss_fn: Callable[..., torch.Tensor] | None,
                 example_inputs: tuple[Any, ...] | None, backend: str, dynamic_dims: Any = None,
                 process_group: Any = None) -> None:
        self.model_name = type(model).__name__
        self.methods = methods
        self.loss_fn = loss_fn
        self.backend = backend
        self.dynamic_dims = dynamic_dims
        self.process_group = process_group
        self.training = True
        optimizer = next((m for m in methods if isinstance(m, Optimizer)), None)
        self._train_state = TrainState(lr=optimizer.lr if optimizer is not None else None)
        self._model: nn.Module | None = copy.deepcopy(model)  # ours from now on; dropped once captured
        self._captured: CapturedModel | None = None
        self._pending_state: Mapping[str, Any] | None = None
        if example_inputs is not None:
            self._capture(tuple(example_inputs))

    # -- capture ----------------------------------------------------------------------------------
    def _capture(self, example_inputs: tuple[Any, ...]) -> CapturedModel:
        checks = tuple(x.detach().clone() if isinstance(x, torch.Tensor) else x for x in example_inputs)
        gm = capture(self._model, checks, self.dynamic_dims)
        captured = CapturedModel(gm, checks, self._train_state, frozenset(dir(type(self))))
        apply_methods(captured, self.methods)
        reduce_grad = None
        if self.process_group is not None:  # data parallel: same start on every rank, gradients averaged
            broadcast_module(gm, self.process_group)
            reduce_grad = gradient_mean(self.process_group)
        captured.trainer = TrainingStep(captured, self.loss_fn, self.backend, reduce_grad)
        if self._pending_state is not None:
            self._load(captured, self._pending_state)
        self._structure = merge.original_structure(self._model)  # no data: for merged_module and adapter names
        self._captured, self._model, self._pending_state = captured, None, None
        return captured

    def _ensure_captured(self, inputs: tuple[Any, ...]) -> CapturedModel:
        return self._captured if self._captured is not None else self._capture(inputs)

    @property
    def captured(self) -> CapturedModel:
        """The captured model (forward graph, contributions, training step); raises before the first call."""
        if self._captured is None:
            raise RuntimeError("the model is captured on first call; call it once or pass example_inputs=")
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
    def __call__(self, *inputs: Any) -> Any:
        return self._ensure_captured(inputs).forward(self.training, self.backend, inputs)

    def step(self, *inputs_and_target: Any) -> torch.Tensor:
        """One training step on ``inputs`` (all but the last argument) and ``target`` (the last); returns the loss."""
        if len(inputs_and_target) < 2:
            raise TypeError("step(*inputs, target) needs at least one input and the target")
        *inputs, target = inputs_and_target
        captured = self._ensure_captured(tuple(inputs))
        loss = captured.trainer(tuple(inputs), target)
        get_plugin_manager().hook.graphopt_step_end(model=self, step=self._train_state.step, loss=loss)
        return loss

    def train(self, mode: bool = True) -> CompiledModel:
        self.training = mode
        return self

    def eval(self) -> CompiledModel:
        return self.train(False)

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
        """Training steps done."""
        return self._train_state.step

    def compile_stats(self) -> CompileStats:
        """How many training-step graphs were traced, and which step variants are compiled now."""
        trainer = self.captured.trainer
        return CompileStats(trainer.traces, tuple(trainer.cached_variants()))

    def training_graphs(self) -> list[torch.fx.GraphModule]:
        """The traced training-step graphs (forward, loss, backward and update as one aten graph) compiled now,
        least recently used first: to read what runs in a step."""
        return self.captured.trainer.traced_graphs()

    # -- parameters and state ---------------------------------------------------------------------
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The trainable parameters (adapters only when adapters were added)."""
        for name, param in self.graph_module.named_parameters():
            if param.requires_grad:
                yield name, param

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, param in self.named_parameters():
            yield param

    def optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """A copy of the fused optimizer's state: ``{parameter: {slot: tensor}}`` (filled at the first step)."""
        return {n: {k: v.detach().clone() for k, v in s.items()} for n, s in self._train_state.slots.items()}

    def descriptions(self) -> dict[str, str]:
        """What each method found or did (``graphopt show`` prints it), by method name."""
        return self.captured.descriptions()

    def state_dict(self) -> dict[str, Any]:
        """Module tensors under their own names, plus optimizer and method state under ``_graphopt.``
        (the format is documented in ``graphopt.train.checkpoint``)."""
        captured = self.captured
        return build_state_dict(captured.gm, self._train_state, captured.method_states())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load what :meth:`state_dict` returned, all or nothing (deferred until capture when not captured)."""
        if self._captured is None:
            self._pending_state = dict(state)
            return
        self._load(self._captured, state)

    def _load(self, captured: CapturedModel, state: Mapping[str, Any]) -> None:
        checkpoint = read_checkpoint(state, captured.gm, self._train_state.lr, sorted(captured.stateful_methods()))
        apply_checkpoint(checkpoint, captured.gm, self._train_state)
        captured.load_method_states(checkpoint.methods)

    # -- adapters, PEFT and plain models (graphopt.interop) -------------------------------------------------
    def merged_module(self) -> nn.Module:
        """A new module of the original model's class with every adapter folded into its weights (PEFT's
        ``merge_and_unload``); checked against ``export_graph(merge=True)`` (see ``graphopt.interop.merge``)."""
        return merge.merged_module(self.export_graph(merge=True), self._structure, self.captured.example_inputs)

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
                                    getattr(config, "_name_or_path", None) or None)

    # -- functions methods added --------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
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

    def __repr__(self) -> str:
        specs = ", ".join(m.spec() for m in self.methods)
        return f"<graphopt.CompiledModel of {self.model_name} [{specs}] backend={self.backend!r}>"


def compile(
    model: nn.Module | type | Callable[..., nn.Module] | None = None,
    *,
    methods: Iterable[MethodSpec] | MethodSpec = (),
    loss_fn: Callable[..., torch.Tensor] | None = None,
    example_inputs: tuple[Any, ...] | None = None,
    backend: str = "inductor",
    dynamic_dims: Sequence[Sequence[int] | None] | None = None,
    process_group: Any = None,
) -> Any:
    """Rewrite ``model`` with ``methods`` and return a :class:`CompiledModel`.

    Without ``model`` it returns a decorator for an ``nn.Module`` subclass (instances come back
    compiled), an instance, or a factory function. Specs are validated here, before any capture.
    ``dynamic_dims``: which input dims the captured graph keeps dynamic, one entry per positional input
    (dim indices or None), e.g. ``[(0, 1)]`` for ``(batch, seq)`` token ids; default the batch dim of
    every tensor input (see ``graphopt.capture``). Export reuses it.
    ``process_group``: a ``torch.distributed`` ProcessGroup for data parallel training: ``m.step`` averages
    the gradients over its ranks inside the training graph (see ``graphopt.distributed``).
    """
    if process_group is not None:
        check_process_group(process_group)
    if backend not in BACKENDS:
        raise OptionError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    registry = {name: info.cls for name, info in method_registry().items()}
    resolved = resolve_methods(methods, registry)
    optimizers = [m.name for m in resolved if isinstance(m, Optimizer)]
    if len(optimizers) > 1:
        raise OptionError(f"one optimizer method per model, got {', '.join(map(repr, optimizers))}; keep one")

    def build(target: nn.Module) -> CompiledModel:
        return CompiledModel(target, [m.fresh() for m in resolved], loss_fn, example_inputs, backend, dynamic_dims,
                             process_group)

    if model is None:
        return lambda target: _wrap(target, build)
    return _wrap(model, build)


def _wrap(target: Any, build: Callable[[nn.Module], CompiledModel]) -> Any:
    if isinstance(target, nn.Module):
        return build(target)
    if inspect.isclass(target) and issubclass(target, nn.Module):
        @functools.wraps(target, updated=())
        def make_compiled(*args: Any, **kwargs: Any) -> CompiledModel:
            return build(target(*args, **kwargs))
        return make_compiled
    if callable(target):
        @functools.wraps(target)
        def compiled_factory(*args: Any, **kwargs: Any) -> CompiledModel:
            model = target(*args, **kwargs)
            if not isinstance(model, nn.Module):
                raise TypeError(f"{target.__name__} returned {type(model).__name__}, not an nn.Module")
            return build(model)
        return compiled_factory
    raise TypeError(f"graphopt.compile takes an nn.Module, a Module subclass or a factory, got {type(target).__name__}")
