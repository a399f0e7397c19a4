"""The training step as one captured graph: forward, loss, backward and the fused parameter update.

``build_step_function`` writes the step as a plain function of (trainable params, frozen params,
buffers, optimizer state, hyperparameters, inputs, target); ``make_fx`` traces it with fake tensors
into one aten-level FX graph (the *training graph*), in which each optimizer update is an in-place
op on the parameter, scheduled right after its gradient exists (:mod:`graphopt.train.schedule`). It is
compiled with ``torch.compile`` (``backend="eager"`` runs the traced graph as is).

What the methods contributed enters here: the optimizer's update rule, loss terms, post-update rules,
hyperparameters and step variants (see :mod:`graphopt.context`), each called through the dispatcher.
One compiled graph is cached per (step variant, input shapes, parameter layout); a variant's graph is
built only when it is not cached.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.traceback import annotate, preserve_node_meta
from torch.utils import _pytree as pytree

from graphopt.captured import CapturedModel
from graphopt.contributions import Contributions
from graphopt.dispatch import STEP, dispatch
from graphopt.errors import OptionError
from graphopt.rewrite.meta import update_annotation
from graphopt.train.schedule import schedule_updates

GradReduce = Callable[[torch.Tensor], torch.Tensor]


def build_step_function(gm: torch.fx.GraphModule, loss_fn: Callable[..., torch.Tensor],
                        contributions: Contributions, reduce_grad: GradReduce | None = None
                        ) -> Callable[..., torch.Tensor]:
    """The training step as a function; the nodes of each parameter's update are tagged with its name.

    ``reduce_grad`` (data parallel, see ``graphopt.distributed``) maps each gradient to the one the update
    uses (the mean over ranks); it runs inside the parameter's update group, or on every gradient before
    the norm when ``max_grad_norm`` clips.
    """
    opt_ctx, optimizer = contributions.optimizer

    def step(params: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
             state: dict[str, dict[str, torch.Tensor]], hyper: dict[str, torch.Tensor],
             inputs: tuple[Any, ...], target: Any) -> torch.Tensor:
        with torch.enable_grad():
            output = torch.func.functional_call(gm, {**params, **frozen, **buffers}, inputs)
            loss = loss_fn(output, target)
            for entry in contributions.loss_terms:
                term = dispatch(entry.ctx, STEP, "loss term", entry.fn, params, hyper)
                if term is not None:
                    loss = loss + term
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        with torch.no_grad():
            clip = None
            reduce_each = reduce_grad is not None and optimizer.max_grad_norm is None
            if reduce_grad is not None and not reduce_each:  # the clipping norm is that of the reduced gradients
                grads = [None if g is None else reduce_grad(g) for g in grads]
            if optimizer.max_grad_norm is not None:  # as torch.nn.utils.clip_grad_norm_; needs every gradient
                norms = [torch.linalg.vector_norm(g) for g in grads if g is not None]
                total = torch.linalg.vector_norm(torch.stack(norms)) if norms else loss.new_zeros(())
                clip = torch.clamp(optimizer.max_grad_norm / (total + 1e-6), max=1.0)
            for (name, param), grad in zip(params.items(), grads):
                with annotate(update_annotation(name)):
                    if grad is None:
                        grad = torch.zeros_like(param)
                    elif reduce_each:
                        grad = reduce_grad(grad)
                    if clip is not None:
                        grad = grad * clip.to(grad.dtype)
                    dispatch(opt_ctx, STEP, f"update of {name!r}", optimizer.step_parameter,
                             name, param, grad, state[name], hyper)
                    for entry in contributions.post_updates:
                        if name in entry.params:
                            dispatch(entry.ctx, STEP, f"post-update rule of {name!r}", entry.fn, param, hyper)
        return loss.detach()

    return step


class _Compiled(NamedTuple):
    """A cached step: the callable that runs it, the traced graph it came from, the parameters it trains."""

    run: Callable[..., torch.Tensor]
    traced: torch.fx.GraphModule
    trained: frozenset[str]


def _signature(tree: Any) -> Hashable:
    leaves, spec = pytree.tree_flatten(tree)
    return str(spec), tuple(
        (tuple(x.shape), x.dtype, x.device, x.requires_grad) if isinstance(x, torch.Tensor) else repr(x)
        for x in leaves
    )


class TrainingStep:
    """Builds, caches and runs the compiled training step of one captured model.

    Compiled steps are cached per (step variant, input shapes, parameter layout), at most
    ``max_cached_graphs`` of them (least recently used dropped first: an evicted variant is built, traced
    and compiled again when it returns). ``traces`` counts the traces made.
    """

    max_cached_graphs: int = 64

    def __init__(self, captured: CapturedModel, loss_fn: Callable[..., torch.Tensor] | None, backend: str,
                 reduce_grad: GradReduce | None = None) -> None:
        self.captured = captured
        self.loss_fn = loss_fn
        self.backend = backend
        self.reduce_grad = reduce_grad
        self.traces = 0
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

    def ensure_state(self, trainable: dict[str, torch.nn.Parameter]) -> None:
        """Create the optimizer state of every trainable parameter that has none yet."""
        opt_ctx, optimizer = self.captured.contributions.optimizer
        slots = self.captured.train_state.slots
        for name, param in trainable.items():
            if name not in slots:
                slots[name] = dispatch(opt_ctx, STEP, f"state of {name!r}", optimizer.state_for, name, param.detach())

    def __call__(self, inputs: tuple[Any, ...], target: Any) -> torch.Tensor:
        contributions, train = self.captured.contributions, self.captured.train_state
        if contributions.optimizer is None:
            raise OptionError('`.step` needs an optimizer method, e.g. methods=[..., "sgd(lr=0.1)"]')
        if self.loss_fn is None:
            raise OptionError(
                "`.step` needs a loss: graphopt.compile(model, ..., loss_fn=torch.nn.functional.cross_entropy)"
            )
        step = train.step + 1
        lr = train.lr_for(step)
        variant = tuple((e.ctx.method.name, v) for e in contributions.step_variants
                        if (v := dispatch(e.ctx, STEP, "step variant choice", e.choose, step)) is not None)
        gm = self.captured.gm
        named = dict(gm.named_parameters())
        trainable = {n: p for n, p in named.items() if p.requires_grad}
        self.ensure_state(trainable)
        hyper = self.hyperparameters(step, lr)
        buffers = dict(gm.named_buffers())
        key = (variant, _signature((inputs, target)), _signature((named, buffers)))
        cached = self._cache.pop(key, None)
        if cached is None:
            variant_gm, skipped = self._variant_graph(variant)
            trained = frozenset(n for n in trainable if n not in skipped)
            args = self._arguments(named, trained, buffers, hyper, inputs, target)
            traced = self._trace(variant_gm, args)
            cached = _Compiled(self._compile(traced), traced, trained)
        self._cache[key] = cached  # most recently used last; the least recently used beyond the bound go
        while len(self._cache) > self.max_cached_graphs:
            self._cache.popitem(last=False)
        with torch.no_grad():
            loss = cached.run(*self._arguments(named, cached.trained, buffers, hyper, inputs, target))
        train.step, train.lr = step, lr
        return loss

    def _arguments(self, named: dict[str, torch.nn.Parameter], trained: frozenset[str],
                   buffers: dict[str, torch.Tensor], hyper: dict[str, torch.Tensor], inputs: tuple[Any, ...],
                   target: Any) -> tuple[Any, ...]:
        params = {n: p for n, p in named.items() if n in trained}
        frozen = {n: p for n, p in named.items() if n not in trained}
        slots = self.captured.train_state.slots
        return params, frozen, buffers, {n: slots[n] for n in params}, hyper, tuple(inputs), target

    # -- building ------------------------------------------------------------------------------------
    def _variant_graph(self, variant: tuple[tuple[str, Hashable], ...]) -> tuple[torch.fx.GraphModule, set[str]]:
        gm, skipped = self.captured.gm, set()
        chosen = dict(variant)
        for entry in self.captured.contributions.step_variants:
            name = entry.ctx.method.name
            if name in chosen:
                gm, skip = dispatch(entry.ctx, STEP, f"variant graph {chosen[name]!r}", entry.build, gm, chosen[name])
                skipped |= set(skip)
        return gm, skipped

    def _trace(self, gm: torch.fx.GraphModule, args: tuple[Any, ...]) -> torch.fx.GraphModule:
        step_fn = build_step_function(gm, self.loss_fn, self.captured.contributions, self.reduce_grad)
        with preserve_node_meta():
            traced = make_fx(step_fn, tracing_mode="fake")(*args)
        self.traces += 1
        traced = schedule_updates(traced)  # each update right after its gradient (see graphopt.train.schedule)
        traced.graph.lint()
        traced.recompile()
        return traced

    def _compile(self, traced: torch.fx.GraphModule) -> Callable[..., torch.Tensor]:
        if self.backend == "eager":
            return traced
        return torch.compile(traced, backend=self.backend, fullgraph=True, dynamic=False)
