"""The training step written as one Python function, which ``graphopt.train.step`` traces into a graph.

``build_step_function`` returns ``step(params, frozen, buffers, state, accum, scaler, hyper, args, kwargs,
target) -> (loss, ok, kept)``: the forward (under autocast for mixed precision), the loss (``loss_fn(output,
target)``, or the loss the model returns), the methods' loss terms, ``torch.autograd.grad``, and per
trainable parameter the optimizer's update and the methods' post-update rules, all in place. The nodes of
each parameter's update are tagged with its name, so they can be scheduled right after its gradient.

Options (:class:`StepOptions`):

- ``kind="accumulate"`` (gradient accumulation over N micro-batches, ``N > 1``): ``acc ← acc + g/N`` and no
  update; ``kind="update"`` on the N-th micro-batch uses ``g ← acc + g/N`` and zeroes ``acc``: N micro-batches
  of equal size take the step one batch of their concatenation takes with a mean loss.
- ``precision``: ``"bf16-mixed"`` / ``"16-mixed"`` run the forward and the loss under ``torch.autocast``;
  parameters, gradients and optimizer state stay in their own (float32) dtype. ``16-mixed`` scales the loss
  by ``S`` (``torch.amp.GradScaler``'s dynamic loss scaling: ``g ← g·(1/S)``; a non-finite gradient halves
  ``S``; 2000 finite steps in a row double it; initial ``2^16``).
- ``guarded`` (``on_nonfinite`` "skip" or "raise", and always under 16-mixed): ``ok`` = the loss and every
  gradient are finite, and every update is computed on copies and written back only where ``ok``, so a
  non-finite step leaves parameters and optimizer state bit-identical. The updates then wait for the whole
  backward pass (every gradient is needed for ``ok``); unguarded, each runs as soon as its gradient exists.
- data parallel (``sync``, :mod:`graphopt.distributed.step_sync`): the gradients are averaged over the ranks
  bucket by bucket (each bucket tagged as a group, so it is issued as soon as its last gradient exists); the
  verdict ``ok`` is every rank's; with sharding each update sees this rank's rows of the parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.fx.traceback import annotate

from graphopt.contributions import Contributions
from graphopt.dispatch import STEP, dispatch
from graphopt.errors import StepError
from graphopt.rewrite.meta import update_annotation
from graphopt.train.checkpointing import BACKWARD, NodeByNode

if TYPE_CHECKING:
    from graphopt.distributed import Shard
    from graphopt.distributed.step_sync import StepSync

AUTOCAST = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
INIT_SCALE, GROWTH_INTERVAL, GROWTH, BACKOFF = 2.0**16, 2000, 2.0, 0.5


@dataclass(frozen=True)
class StepOptions:
    """How one step graph is built (see the module docstring)."""

    kind: str = "update"             # "update" | "accumulate"
    accumulation_steps: int = 1
    precision: str = "32"
    guarded: bool = False
    device_type: str = "cpu"
    checkpoint: tuple[str, ...] = ()  # residual blocks to recompute in the backward (graphopt.train.checkpointing)

    @property
    def scaled(self) -> bool:
        return self.precision == "16-mixed"


def model_loss(output: Any) -> torch.Tensor:
    """The loss a model returned itself (``output["loss"]``, ``output.loss``); an error when there is none."""
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise StepError("`.step` needs a loss: the model returned none (pass labels= to a model that computes its "
                        "own loss, or graphopt.compile(..., loss_fn=...))")
    return loss


def _user_loss(loss_fn: Callable[..., torch.Tensor], output: Any, target: Any) -> torch.Tensor:
    """``loss_fn(output, target)``, which must be a scalar tensor; its errors say they come from ``loss_fn``."""
    try:
        loss = loss_fn(output, target)
    except Exception as err:
        raise StepError(f"loss_fn failed on the model's output ({_describe(output)}) and the target "
                        f"({_describe(target)}): {type(err).__name__}: {err}") from err
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.is_floating_point():
        raise StepError(f"loss_fn must return a scalar floating tensor (e.g. with reduction='mean'), got "
                        f"{_describe(loss)}")
    return loss


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} tensor of shape {list(value.shape)}"
    return type(value).__name__


def scaler_state() -> dict[str, torch.Tensor]:
    """The initial loss scale ``S = 2^16`` and growth counter of 16-mixed precision."""
    return {"scale": torch.tensor(INIT_SCALE, dtype=torch.float32), "growth": torch.zeros((), dtype=torch.float32)}


def build_step_function(gm: torch.fx.GraphModule, loss_fn: Callable[..., torch.Tensor] | None,
                        contributions: Contributions, options: StepOptions,
                        sync: StepSync | None = None) -> Callable[..., tuple[Any, ...]]:
    """The training step as a function (see the module docstring). ``sync`` (data parallel, see
    ``graphopt.distributed.step_sync``) adds the collectives: buffers synchronised before the forward, full
    parameters gathered from shards, gradients averaged over the ranks, every rank's verdict on ``ok``."""
    opt_ctx, optimizer = contributions.optimizer
    dtype = AUTOCAST[options.precision]
    forward = NodeByNode(gm)

    def step(params: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
             state: dict[str, dict[str, torch.Tensor]], accum: dict[str, torch.Tensor],
             scaler: dict[str, torch.Tensor], hyper: dict[str, torch.Tensor], args: tuple[Any, ...],
             kwargs: dict[str, Any], target: Any) -> tuple[Any, ...]:
        if sync is not None:
            sync.sync_buffers(buffers)
        with torch.enable_grad():
            full, whole_frozen = sync.full_parameters(params, frozen) if sync is not None else (params, frozen)
            with torch.autocast(options.device_type, dtype=dtype, enabled=dtype is not None):
                tensors = {**full, **whole_frozen, **buffers}
                if options.checkpoint:  # node by node, so the trace keeps each node's module path
                    output = torch.func.functional_call(forward, {f"gm.{k}": v for k, v in tensors.items()}, args,
                                                        kwargs)
                else:
                    output = torch.func.functional_call(gm, tensors, args, kwargs)
                loss = model_loss(output) if loss_fn is None else _user_loss(loss_fn, output, target)
            for entry in contributions.loss_terms:
                term = dispatch(entry.ctx, STEP, "loss term", entry.fn, full, hyper)
                if term is not None:
                    loss = loss + term
            scale = scaler["scale"] if options.scaled else None
            objective = loss * scale.to(loss.dtype) if scale is not None else loss
            with annotate(BACKWARD):
                grads = list(torch.autograd.grad(objective, list(full.values()), allow_unused=True))
        with torch.no_grad():
            ok = _update(params, full, grads, loss, scale, state, accum, scaler, hyper)
        # torch.compile (2.13, CPU) drops in-place writes to 0-d float64 graph inputs that no output uses
        # (e.g. a step counter updated through torch.where): returning them keeps the writes
        kept = tuple(v for slots in (*state.values(), scaler) for v in slots.values() if v.dim() == 0)
        return loss.detach(), ok, kept

    def _update(params: dict[str, torch.Tensor], full: dict[str, torch.Tensor], grads: list[Any],
                loss: torch.Tensor, scale: Any, state: dict[str, dict[str, torch.Tensor]],
                accum: dict[str, torch.Tensor], scaler: dict[str, torch.Tensor], hyper: dict[str, torch.Tensor]) -> Any:
        names, steps = list(params), options.accumulation_steps
        inverse = scale.double().reciprocal().float() if scale is not None else None  # as GradScaler.unscale_

        def unscaled(name: str, grad: Any) -> torch.Tensor:
            if grad is None:  # unused: zero (shaped like the full parameter, read from no tensor)
                grad = torch.zeros(full[name].shape, dtype=full[name].dtype, device=full[name].device)
            return grad * inverse.to(grad.dtype) if inverse is not None else grad

        def total(name: str, grad: Any) -> torch.Tensor:  # with the accumulated micro-batches
            grad = unscaled(name, grad)
            return accum[name] + grad / steps if steps > 1 else grad

        if options.kind == "accumulate":  # no update, no gradient communication (DDP's no_sync)
            grads = [unscaled(n, g) for n, g in zip(names, grads)]
            ok = _finite(loss, grads) if options.guarded else None
            if ok is not None and sync is not None:  # every rank skips alike
                ok = sync.all_true(ok)
            for name, grad in zip(names, grads):
                value = accum[name] + grad / steps
                accum[name].copy_(value if ok is None else torch.where(ok, value, accum[name]))
            return ok
        if sync is None:
            grads = [total(n, g) for n, g in zip(names, grads)]
        else:  # averaged over the ranks, bucket by bucket (this rank's rows when sharded)
            grads = sync.reduce(full, dict(zip(names, grads)), total)
        ok = None
        if options.guarded:  # every rank decides alike: the verdict is every rank's
            ok = _finite(loss, grads)
            if sync is not None:
                ok = sync.all_true(ok)
        clip = None
        if optimizer.max_grad_norm is not None:  # as torch.nn.utils.clip_grad_norm_; needs every gradient
            norm = sync.grad_norm(names, grads) if sync is not None else torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            clip = torch.clamp(optimizer.max_grad_norm / (norm + 1e-6), max=1.0)
        updated = {}
        for (name, param), grad in zip(params.items(), grads):
            with annotate(update_annotation(name)):
                if clip is not None:
                    grad = grad * clip.to(grad.dtype)
                target = param if sync is None else sync.local_parameter(name, param)
                _apply_update(name, target, grad, state[name], hyper, ok, None if sync is None else sync.shard(name))
                updated[name] = target
                if steps > 1:
                    accum[name].zero_()
        if sync is not None:
            sync.write_back(params, updated)
        if options.scaled:
            _update_scale(scaler, ok)
        return ok

    def _apply_update(name: str, param: torch.Tensor, grad: torch.Tensor, slots: dict[str, torch.Tensor],
                      hyper: dict[str, torch.Tensor], ok: Any, shard: Shard | None) -> None:
        """The optimizer's update and the post-update rules of ``param`` (with sharding, this rank's rows of it:
        ``shard``); with ``ok`` on copies, kept where ok."""
        target, target_slots = param, slots
        if ok is not None:
            target, target_slots = param.clone(), {k: v.clone() for k, v in slots.items()}
        dispatch(opt_ctx, STEP, f"update of {name!r}", optimizer.step_parameter, name, target, grad, target_slots,
                 hyper, shard)
        for entry in contributions.post_updates:
            if name in entry.params:
                dispatch(entry.ctx, STEP, f"post-update rule of {name!r}", entry.fn, target, hyper)
        if ok is not None:
            param.copy_(torch.where(ok, target, param))
            for key, value in slots.items():
                value.copy_(torch.where(ok, target_slots[key], value))

    return step


def _finite(loss: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    """Whether the loss and every gradient are finite, as one boolean 0-d tensor."""
    return torch.stack([torch.isfinite(loss)] + [torch.isfinite(g).all() for g in grads]).all()


def _update_scale(scaler: dict[str, torch.Tensor], ok: torch.Tensor) -> None:
    """GradScaler's update: a finite step counts towards growth (×2 after 2000), a non-finite one halves S."""
    scale, growth = scaler["scale"], scaler["growth"]
    grown = growth + 1
    double = grown >= GROWTH_INTERVAL
    new_scale = torch.where(ok, torch.where(double, scale * GROWTH, scale), scale * BACKOFF)
    new_growth = torch.where(ok, torch.where(double, torch.zeros_like(growth), grown), torch.zeros_like(growth))
    scale.copy_(new_scale)
    growth.copy_(new_growth)
