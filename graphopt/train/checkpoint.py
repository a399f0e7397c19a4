"""The checkpoint format of a compiled model, and loading it all or nothing.

``m.state_dict()`` is a flat dict: the forward graph's tensors under their own names (``encoder.0.weight``,
adapters as ``encoder.0.hra_u``), then graphopt's entries under ``_graphopt.``:

| key | value |
|---|---|
| ``_graphopt.step`` | optimizer steps done (int) |
| ``_graphopt.micro`` / ``_graphopt.skipped`` | micro-batches accumulated since the last step / steps skipped (int) |
| ``_graphopt.lr`` | the learning rate of the next step (float, or None without an optimizer) |
| ``_graphopt.optim.<param>.<slot>`` | the optimizer's state of ``<param>`` (e.g. ``momentum_buffer``) |
| ``_graphopt.accum.<param>`` | ``<param>``'s gradient accumulation buffer |
| ``_graphopt.scaler.<key>`` | the loss scale and its growth counter (16-mixed) |
| ``_graphopt.rng.<device>`` | the step generator's state on ``<device>`` (``cpu``, ``cuda:0``) |
| ``_graphopt.method.<method>.<key>`` | a method's own state (e.g. a schedule's seed) |

:func:`read_checkpoint` checks a state dict against the model completely before anything is changed, and
:func:`apply_checkpoint` then applies it.

A sharded model (``graphopt.distributed``, ``replicas``) writes the unsharded layout, its shards gathered (every
rank must call ``state_dict`` together), so the checkpoint is that of a single process and loads on any world
size; loading cuts it to each rank's rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from graphopt.errors import CheckpointError
from graphopt.train.state import TrainState

if TYPE_CHECKING:
    from graphopt.distributed import Replicas

PREFIX = "_graphopt."
STEP, MICRO, SKIPPED, LR = PREFIX + "step", PREFIX + "micro", PREFIX + "skipped", PREFIX + "lr"
OPTIM, ACCUM, SCALER, RNG, METHOD = (PREFIX + k for k in ("optim.", "accum.", "scaler.", "rng.", "method."))
COUNTERS = (STEP, MICRO, SKIPPED)


def build_state_dict(module: torch.nn.Module, train: TrainState, method_states: Mapping[str, Mapping[str, Any]],
                     replicas: Replicas | None = None) -> dict[str, Any]:
    """The flat state dict of the table above (tensors cloned: later steps do not change it)."""
    state: dict[str, Any] = {k: v.detach().clone() for k, v in module.state_dict().items()}
    all_slots = train.slots
    if replicas is not None:
        state, all_slots = replicas.unsharded(state, all_slots)
    state[STEP], state[MICRO], state[SKIPPED], state[LR] = train.step, train.micro, train.skipped, train.lr
    for name, slots in all_slots.items():
        for slot, value in slots.items():
            state[f"{OPTIM}{name}.{slot}"] = value.detach().clone()
    for prefix, values in ((ACCUM, train.accum), (SCALER, train.scaler), (RNG, train.rng)):
        for key, value in values.items():
            state[prefix + key] = value.detach().clone()
    for method, values in method_states.items():
        for key, value in values.items():
            state[f"{METHOD}{method}.{key}"] = value
    return state


@dataclass(frozen=True)
class Checkpoint:
    """A state dict split into its parts, checked against one compiled model."""

    module: dict[str, torch.Tensor]
    counters: dict[str, int]
    lr: float | None
    slots: dict[str, dict[str, torch.Tensor]]
    accum: dict[str, torch.Tensor]
    scaler: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]
    methods: dict[str, dict[str, Any]]


def read_checkpoint(state: Mapping[str, Any], module: torch.nn.Module, lr: float | None,
                    stateful_methods: Sequence[str], replicas: Replicas | None = None) -> Checkpoint:
    """Split ``state`` and check it fits ``module`` (the forward graph; its full shapes when sharded) and the
    model's methods; raises ``CheckpointError`` naming every mismatch, having changed nothing."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"load_state_dict takes the dict m.state_dict() returned, got {type(state).__name__}")
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if replicas is not None:
        own.update({k: v for k, v in replicas.full_shapes().items() if k in own})
    tensors = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"state_dict does not fit this model: missing {missing}, unexpected {unexpected}")
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != own[key]:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(f"state_dict entry {key!r} has shape {shape}, the model's has {own[key]}")
    params = [n for n, _ in module.named_parameters()]
    slots: dict[str, dict[str, torch.Tensor]] = {}
    methods: dict[str, dict[str, Any]] = {}
    extras: dict[str, dict[str, torch.Tensor]] = {ACCUM: {}, SCALER: {}, RNG: {}}
    for key, value in state.items():
        prefix = next((p for p in extras if key.startswith(p)), None)
        if prefix is not None:
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"state_dict entry {key!r} must be a tensor, got {type(value).__name__}")
            extras[prefix][key[len(prefix):]] = value
        elif key.startswith(OPTIM):
            rest = key[len(OPTIM):]
            name = max((p for p in params if rest.startswith(p + ".")), key=len, default=None)
            if name is None:
                raise CheckpointError(f"optimizer state {key!r} names no parameter of this model")
            slots.setdefault(name, {})[rest[len(name) + 1:]] = value
        elif key.startswith(METHOD):
            method, _, sub = key[len(METHOD):].partition(".")
            if method not in stateful_methods:
                known = ", ".join(stateful_methods) or "none"
                raise CheckpointError(f"state_dict holds state of method {method!r} ({key!r}), which this model "
                                      f"has no state for; its methods with state: {known}")
            methods.setdefault(method, {})[sub] = value
        elif key not in (*COUNTERS, LR) and key.startswith(PREFIX):
            raise CheckpointError(f"state_dict entry {key!r} is not part of graphopt's format")
    counters = {}
    for key in COUNTERS:
        count = state.get(key, 0)
        if isinstance(count, torch.Tensor):
            count = count.item()
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise CheckpointError(f"state_dict entry {key!r} must be a count >= 0, got {count!r}")
        counters[key] = count
    unknown = [n for n in extras[ACCUM] if n not in params]
    if unknown:
        raise CheckpointError(f"gradient accumulation state {ACCUM + unknown[0]!r} names no parameter of this model")
    return Checkpoint(dict(tensors), counters, state.get(LR, lr), slots, extras[ACCUM], extras[SCALER], extras[RNG],
                      methods)


def apply_checkpoint(checkpoint: Checkpoint, module: torch.nn.Module, train: TrainState,
                     replicas: Replicas | None = None) -> None:
    """Copy a checked ``checkpoint`` into ``module`` and ``train`` (cut to this rank's rows when sharded; method
    state is loaded by the caller)."""
    tensors, all_slots = checkpoint.module, checkpoint.slots
    if replicas is not None:
        tensors, all_slots = replicas.sharded(tensors, all_slots)
    with torch.no_grad():
        module.load_state_dict(tensors, strict=True)
    train.step, train.micro, train.skipped = (checkpoint.counters[k] for k in COUNTERS)
    train.lr = checkpoint.lr
    train.slots = {n: {k: v.detach().clone() for k, v in s.items()} for n, s in all_slots.items()}
    train.accum = {k: v.detach().clone() for k, v in checkpoint.accum.items()}
    train.scaler = {k: v.detach().clone() for k, v in checkpoint.scaler.items()}
    train.rng = {k: v.detach().clone() for k, v in checkpoint.rng.items()}
