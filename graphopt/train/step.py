"""The training step as one captured, compiled graph: forward, loss, backward and the fused update.

:class:`TrainingStep` runs ``m.step``: it picks the step's graph variant (the methods' step variants, and
for gradient accumulation whether this micro-batch updates), builds the step function
(:mod:`graphopt.train.step_function`) for a variant it has not cached, traces it with dynamic input dims
(:mod:`graphopt.train.tracing`), moves each update right after its gradient (:mod:`graphopt.train.schedule`)
and compiles it. One compiled graph is cached per (variant, input signature, parameter layout): every batch
size of a dynamic dim shares it. Data parallel (``process_group=``): the step function gets the collectives of
``graphopt.distributed.step_sync``, the gathers of ``sharding="full"`` are placed before each use
(``graphopt.distributed.gathers``), and inductor compiles with compute–communication overlap on. The step runs
on its own random-number generator (``TrainState.step_rng``).

``on_nonfinite``: ``"apply"`` updates whatever the numbers; ``"skip"`` leaves parameters and optimizer state
bit-identical when the loss or a gradient is not finite, counts the step in ``skipped`` and logs a warning;
``"raise"`` does the same and raises ``StepError``.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import replace
from typing import Any, NamedTuple

import torch
from torch.utils import _pytree as pytree

from graphopt.captured import CapturedModel
from graphopt.dispatch import STEP, dispatch
from graphopt.distributed.replicas import OVERLAP
from graphopt.errors import OptionError, StepError
from graphopt.inputs import CallInputs, Dims
from graphopt.progress import logger, stage
from graphopt.rewrite.blocks import find_blocks
from graphopt.rewrite.modes import copy_graph_module
from graphopt.train.checkpointing import checkpoint_blocks
from graphopt.train.compile_passes import HoistUpdates, UnfuseCopiedAddmm
from graphopt.train.schedule import schedule_updates
from graphopt.train.step_function import StepOptions, build_step_function, scaler_state
from graphopt.train.tracing import compile_graph, mark_dynamic, target_dims, trace_step
from graphopt.uninterrupted import uninterrupted

NONFINITE = ("skip", "raise", "apply")


class _Compiled(NamedTuple):
    """A cached step: what runs it, the traced graph, the parameters it trains, the target's dynamic dims."""

    run: Callable[..., Any]
    traced: torch.fx.GraphModule
    trained: frozenset[str]
    target_dynamic: tuple[int, ...]


class TrainingStep:
    """Builds, caches and runs the compiled training step of one captured model.

    At most ``max_cached_graphs`` compiled steps are kept (least recently used dropped first: an evicted
    variant is built, traced and compiled again when it returns). ``traces`` counts the traces made.
    """

    max_cached_graphs: int = 64

    def __init__(self, captured: CapturedModel, loss_fn: Callable[..., torch.Tensor] | None, backend: str,
                 options: StepOptions, on_nonfinite: str, checkpoint: bool | tuple[str, ...] | None = None) -> None:
        self.captured = captured
        self.checkpoint = checkpoint
        self.loss_fn = loss_fn
        self.backend = backend
        self.options = options
        self.on_nonfinite = on_nonfinite
        self.traces = 0
        self._specialised: set[tuple[Any, int]] = set()  # dynamic dims the step's code made static
        self._cache: OrderedDict[Hashable, _Compiled] = OrderedDict()

    def invalidate(self) -> None:
        """Forget every compiled step (the graph or its parameters changed)."""
        self._cache.clear()

    def cached_variants(self) -> list[Hashable]:
        """The step variant of each compiled step in the cache, least recently used first."""
        return [key[0] for key in self._cache]

    def traced_graphs(self) -> list[torch.fx.GraphModule]:
        """The traced training graph of each cached step (what ``torch.compile`` receives), in cache order."""
        return [entry.traced for entry in self._cache.values()]

    # -- per step ------------------------------------------------------------------------------------
    def hyperparameters(self, step: int, lr: float) -> dict[str, torch.Tensor]:
        values: dict[str, float] = {"lr": float(lr), "step": float(step)}
        for key, entry in self.captured.contributions.hyperparameters.items():
            values[key] = float(dispatch(entry.ctx, STEP, f"hyperparameter {key!r}", entry.fn, step))
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}

    def ensure_state(self, trainable: dict[str, torch.nn.Parameter]) -> Callable[[], None]:
        """Create the optimizer state (and accumulation buffers, loss scale) that does not exist yet; returns
        what forgets it again (a step that fails leaves the state as it was)."""
        opt_ctx, optimizer = self.captured.contributions.optimizer
        train, parallel = self.captured.train_state, self.captured.parallel
        state_for = optimizer.state_for if parallel is None else functools.partial(parallel.state_for, optimizer)
        slots = {n: dispatch(opt_ctx, STEP, f"state of {n!r}", state_for, n, p.detach())
                 for n, p in trainable.items() if n not in train.slots}
        accum = {n: (torch.zeros_like(p, memory_format=torch.preserve_format) if parallel is None  # full-size,
                     else p.new_zeros(parallel.shards[n].shape)).detach()                          # also sharded
                 for n, p in trainable.items() if self.options.accumulation_steps > 1 and n not in train.accum}
        scaler = self.options.scaled and not train.scaler
        train.slots.update(slots)
        train.accum.update(accum)
        if scaler:
            train.scaler = scaler_state()

        def forget() -> None:
            for name in slots:
                train.slots.pop(name, None)
            for name in accum:
                train.accum.pop(name, None)
            if scaler:
                train.scaler = {}

        return forget

    def __call__(self, inputs: CallInputs, target: Any) -> torch.Tensor:
        captured, train = self.captured, self.captured.train_state
        if captured.contributions.optimizer is None:
            raise OptionError('`.step` needs an optimizer method, e.g. methods=[..., "sgd(lr=0.1)"]')
        captured.check_call(inputs)
        step = train.step + 1
        lr = train.lr_for(step)
        variant = tuple((e.ctx.method.name, v) for e in captured.contributions.step_variants
                        if (v := dispatch(e.ctx, STEP, "step variant choice", e.choose, step)) is not None)
        gm = captured.gm
        named = dict(gm.named_parameters())
        trainable = {n: p for n, p in named.items() if p.requires_grad}
        if not trainable:
            raise StepError("nothing to train: the model has no parameter that requires a gradient (an empty model, "
                            "or every parameter frozen)")
        forget = self.ensure_state(trainable)
        try:
            return self._run(step, lr, variant, named, trainable, inputs, target)
        except BaseException:
            forget()
            raise

    def _run(self, step: int, lr: float, variant: tuple[tuple[str, Hashable], ...],
             named: dict[str, torch.nn.Parameter], trainable: dict[str, torch.nn.Parameter], inputs: CallInputs,
             target: Any) -> torch.Tensor:
        captured, train = self.captured, self.captured.train_state
        accumulating = train.micro + 1 < self.options.accumulation_steps
        gm = captured.gm
        hyper = self.hyperparameters(step, lr)
        buffers = dict(gm.named_buffers())
        dims = self._dims()
        key = (variant, accumulating, torch.is_autocast_enabled(self.options.device_type),
               _signature(inputs, dims), _signature(target, {0: target_dims(target, inputs, dims)}),
               _signature((named, buffers), {}))
        cached = self._cache.pop(key, None)
        if cached is None:
            cached = self._build(variant, accumulating, named, trainable, buffers, hyper, inputs, target)
        self._cache[key] = cached  # most recently used last; the least recently used beyond the bound go
        while len(self._cache) > self.max_cached_graphs:
            self._cache.popitem(last=False)
        if self.backend != "eager":
            mark_dynamic(inputs, dims, target, cached.target_dynamic)
        args = self._arguments(named, cached.trained, buffers, hyper, inputs, target)
        rng = dict(train.rng)  # the states are replaced, never written in place: a shallow copy restores them
        with uninterrupted():  # a Ctrl-C lands before or after the step, never halfway through its writes
            with torch.no_grad(), train.step_rng(_devices(named, inputs)):
                loss, ok, _ = cached.run(*args)
            if ok is not None and not bool(ok):
                return self._nonfinite(loss, step, rng)
            if accumulating:
                train.micro += 1
            else:
                train.step, train.lr, train.micro = step, lr, 0
        return loss

    def _nonfinite(self, loss: torch.Tensor, step: int, rng: dict[str, torch.Tensor]) -> torch.Tensor:
        """``on_nonfinite="raise"``: a ``StepError`` with everything as before the call (the step RNG too);
        ``"skip"``: count the batch as skipped and go on."""
        train = self.captured.train_state
        what = f"step {step}: the loss ({float(loss):g}) or a gradient is not finite; nothing was updated"
        if self.on_nonfinite == "raise":
            train.rng = rng
            raise StepError(f"{what} (on_nonfinite='raise'; use on_nonfinite='skip' to go on without the batch)")
        train.skipped += 1
        logger.warning("%s (skipped, %d so far)", what, train.skipped)
        return loss

    def checkpoint_paths(self, gm: torch.fx.GraphModule) -> tuple[str, ...]:
        """The residual blocks of ``gm`` whose activations are recomputed (``checkpoint_blocks``)."""
        if not self.checkpoint:
            return ()
        globs = None if self.checkpoint is True else list(self.checkpoint)
        return tuple(block.path for block in find_blocks(gm, globs, "checkpoint_blocks"))

    def _dims(self) -> Dims:
        dims = {k: tuple(d for d in v if (k, d) not in self._specialised) for k, v in self.captured.dims.items()}
        return {k: v for k, v in dims.items() if v}

    def _arguments(self, named: dict[str, torch.nn.Parameter], trained: frozenset[str],
                   buffers: dict[str, torch.Tensor], hyper: dict[str, torch.Tensor], inputs: CallInputs,
                   target: Any) -> tuple[Any, ...]:
        train = self.captured.train_state
        params = {n: p for n, p in named.items() if n in trained}
        frozen = {n: p for n, p in named.items() if n not in trained}
        accum = {n: train.accum[n] for n in params} if self.options.accumulation_steps > 1 else {}
        return (params, frozen, buffers, {n: train.slots[n] for n in params}, accum, train.scaler, hyper,
                inputs.args, inputs.kwargs, target)

    # -- building ------------------------------------------------------------------------------------
    def _build(self, variant: tuple[tuple[str, Hashable], ...], accumulating: bool,
               named: dict[str, torch.nn.Parameter], trainable: dict[str, torch.nn.Parameter],
               buffers: dict[str, torch.Tensor], hyper: dict[str, torch.Tensor], inputs: CallInputs,
               target: Any) -> _Compiled:
        gm, skipped = self.captured.gm, set()
        chosen = dict(variant)
        for entry in self.captured.contributions.step_variants:
            name = entry.ctx.method.name
            if name in chosen:
                gm, skip = dispatch(entry.ctx, STEP, f"variant graph {chosen[name]!r}", entry.build, gm, chosen[name])
                skipped |= set(skip)
        if self.captured.contributions.training_passes:
            gm = copy_graph_module(gm)
            for entry in self.captured.contributions.training_passes:
                dispatch(entry.ctx, STEP, "training pass", entry.fn, gm)
            gm.graph.lint()
            gm.recompile()
        trained = frozenset(n for n in trainable if n not in skipped)
        blocks = self.checkpoint_paths(gm)
        options = replace(self.options, kind="accumulate" if accumulating else "update", checkpoint=blocks)
        parallel = self.captured.parallel
        step_fn = build_step_function(gm, self.loss_fn, self.captured.contributions, options,
                                      None if parallel is None else parallel.step_sync(self.captured.gm))
        args = self._arguments(named, trained, buffers, hyper, inputs, target)
        what = f"training step {variant or 'full graph'}{' (accumulate)' if accumulating else ''}"
        dims = self._dims()
        with stage(f"{what}: traced"):
            trace = trace_step(step_fn, args[:7], inputs, dims, target)
        self.traces += 1
        self._specialised |= trace.specialised
        traced = trace.graph
        if blocks:
            recomputed = checkpoint_blocks(traced, blocks)
            logger.info("%s: %d blocks checkpointed (%d values recomputed in the backward)", what, len(blocks),
                        recomputed)
        if parallel is not None:  # the parameter gathers of sharding="full" before each use (graphopt.distributed)
            parallel.place_collectives(traced, what)
        traced = schedule_updates(traced)  # each update right after its gradient (graphopt.train.schedule)
        traced.graph.lint()
        traced.recompile()
        config = {"post_grad_custom_post_pass": UnfuseCopiedAddmm(), "_post_fusion_custom_pass": HoistUpdates(),
                  **(OVERLAP if parallel is not None else {})}  # inductor overlaps the collectives with compute
        return _Compiled(compile_graph(traced, self.backend, what, self.captured.count_compile, config), traced,
                         trained, target_dims(target, inputs, self._dims()))


def _signature(tree: Any, dims: dict[Any, tuple[int, ...]]) -> Hashable:
    """Structure, dtypes, devices and shapes of ``tree``'s tensors, dynamic dims of ``CallInputs`` left out."""
    if isinstance(tree, CallInputs):
        parts = [(key, _leaf(value, dims.get(key, ()))) for key, value in tree.items()]
        return tree.signature(), tuple(parts)
    leaves, spec = pytree.tree_flatten(tree)
    return str(spec), tuple(_leaf(x, dims.get(0, ()) if len(leaves) == 1 else ()) for x in leaves)


def _leaf(value: Any, dynamic: tuple[int, ...]) -> Hashable:
    if not isinstance(value, torch.Tensor):
        return repr(value)
    shape = tuple(None if d in dynamic else n for d, n in enumerate(value.shape))
    return shape, value.dtype, value.device, value.requires_grad


def _devices(named: dict[str, torch.nn.Parameter], inputs: CallInputs) -> set[torch.device]:
    tensors = [*named.values(), *(v for _, v in inputs.items() if isinstance(v, torch.Tensor))]
    return {t.device for t in tensors}

