"""The checkpoint format of a compiled model, checked completely before anything is loaded.

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

:func:`read_checkpoint` checks a state dict against the model's :class:`Layout` — every key, shape and dtype,
the slot names of this optimizer, finite values and valid counters — and raises ``CheckpointError`` naming
the first mismatch, having changed nothing; :func:`apply_checkpoint` then applies it. With ``strict=False``,
missing and unexpected entries are left out and reported instead of raising (shapes and values are still
checked).

A sharded model (``graphopt.distributed``, ``replicas``) writes the unsharded layout, its shards gathered (every
rank must call ``state_dict`` together), so the checkpoint is that of a single process and loads on any world
size; loading cuts it to each rank's rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from graphopt.errors import CheckpointError
from graphopt.train.state import TrainState

if TYPE_CHECKING:
    from graphopt.distributed import Replicas

PREFIX = "_graphopt."
STEP, MICRO, SKIPPED, LR = PREFIX + "step", PREFIX + "micro", PREFIX + "skipped", PREFIX + "lr"
OPTIM, ACCUM, SCALER, RNG, METHOD = (PREFIX + k for k in ("optim.", "accum.", "scaler.", "rng.", "method."))
COUNTERS = (STEP, MICRO, SKIPPED)
Spec = tuple[tuple[int, ...], torch.dtype]


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


@dataclass
class Layout:
    """What a checkpoint must fit. ``tensors(method_states)``: every module tensor's (shape, dtype) once the
    methods loaded their state (a method may resize its parameters: a pruned SoRA); ``trainable``: the
    parameters that carry optimizer state; ``slots(name, spec)``: the optimizer's slots of such a parameter."""

    tensors: Callable[[Mapping[str, Mapping[str, Any]]], dict[str, Spec]]
    trainable: Sequence[str]
    slots: Callable[[str, Spec], dict[str, Spec]] | None
    stateful_methods: Sequence[str]
    accumulation_steps: int = 1
    scaled: bool = False
    lr: float | None = None


class LoadReport(NamedTuple):
    """What ``load_state_dict(strict=False)`` left out: entries the model has and the state lacks, and
    entries of the state the model has no place for (``torch.nn.Module.load_state_dict``'s two lists)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


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
    report: LoadReport = field(default_factory=lambda: LoadReport([], []))


def read_checkpoint(state: Mapping[str, Any], layout: Layout, strict: bool = True) -> Checkpoint:
    """Split ``state`` and check it completely against ``layout`` (see the module docstring)."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"load_state_dict takes the dict m.state_dict() returned, got {type(state).__name__}")
    missing: list[str] = []
    unexpected: list[str] = []
    methods = _method_states(state, layout.stateful_methods, strict, unexpected)
    expected = layout.tensors(methods)
    tensors = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
    for key, spec in expected.items():
        if key not in tensors:
            missing.append(key)
        else:
            _check_tensor(key, tensors[key], spec)
    unexpected += [k for k in tensors if k not in expected]
    slots: dict[str, dict[str, torch.Tensor]] = {}
    extras: dict[str, dict[str, Any]] = {ACCUM: {}, SCALER: {}, RNG: {}}
    for key, value in state.items():
        prefix = next((p for p in (OPTIM, *extras) if key.startswith(p)), None)
        if prefix == OPTIM:
            rest = key[len(OPTIM):]
            name = max((p for p in layout.trainable if rest.startswith(p + ".")), key=len, default=None)
            if name is None:
                unexpected.append(key)
            else:
                slots.setdefault(name, {})[rest[len(name) + 1:]] = value
        elif prefix is not None:
            extras[prefix][key[len(prefix):]] = value
        elif key.startswith(PREFIX) and key not in (*COUNTERS, LR) and not key.startswith(METHOD):
            unexpected.append(key)
    counters = {key: _count(key, state.get(key, 0)) for key in COUNTERS}
    if layout.slots is not None:
        _check_slots(slots, expected, layout, counters[STEP], strict, missing)
    _check_extras(extras, expected, layout, counters)
    lr = _lr(state.get(LR, layout.lr))
    if strict and (missing or unexpected):
        raise CheckpointError(f"state_dict does not fit this model: missing {missing}, unexpected {unexpected} "
                              "(load_state_dict(state, strict=False) leaves them out)")
    kept = {k: v for k, v in tensors.items() if k in expected}
    return Checkpoint(kept, counters, lr, slots, extras[ACCUM], extras[SCALER], extras[RNG], methods,
                      LoadReport(missing, unexpected))


def _method_states(state: Mapping[str, Any], stateful: Sequence[str], strict: bool,
                   unexpected: list[str]) -> dict[str, dict[str, Any]]:
    methods: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        if key.startswith(METHOD):
            method, _, sub = key[len(METHOD):].partition(".")
            if method not in stateful:
                if strict:
                    known = ", ".join(stateful) or "none"
                    raise CheckpointError(f"state_dict holds state of method {method!r} ({key!r}), which this "
                                          f"model has no state for; its methods with state: {known}")
                unexpected.append(key)
            else:
                methods.setdefault(method, {})[sub] = value
    absent = [m for m in stateful if m not in methods]
    if absent and strict:
        raise CheckpointError(f"state_dict has no state of method {absent[0]!r}: it was saved from a model without "
                              "it (load_state_dict(state, strict=False) keeps the method's own)")
    return methods


def _check_tensor(key: str, value: Any, spec: Spec) -> None:
    shape, dtype = spec
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"state_dict entry {key!r} must be a tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape) or value.dtype != dtype:
        raise CheckpointError(f"state_dict entry {key!r} is {str(value.dtype).removeprefix('torch.')}"
                              f"{list(value.shape)}, the model's is {str(dtype).removeprefix('torch.')}{list(shape)}")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise CheckpointError(f"state_dict entry {key!r} holds nan or inf values")


def _check_slots(slots: dict[str, dict[str, torch.Tensor]], expected: Mapping[str, Spec], layout: Layout,
                 step: int, strict: bool, missing: list[str]) -> None:
    for name in layout.trainable:
        if name not in expected:
            continue
        want = layout.slots(name, expected[name])
        have = slots.get(name)
        if have is None:
            if step > 0 and want:
                missing.extend(f"{OPTIM}{name}.{slot}" for slot in want)
            continue
        if set(have) != set(want):
            raise CheckpointError(f"optimizer state of {name!r} has slots {sorted(have)}, this model's optimizer "
                                  f"keeps {sorted(want)}: the checkpoint comes from another optimizer")
        for slot, value in have.items():
            _check_tensor(f"{OPTIM}{name}.{slot}", value, want[slot])


def _check_extras(extras: Mapping[str, dict[str, Any]], expected: Mapping[str, Spec], layout: Layout,
                  counters: Mapping[str, int]) -> None:
    for name, value in extras[ACCUM].items():
        if name not in layout.trainable or name not in expected:
            raise CheckpointError(f"gradient accumulation state {ACCUM + name!r} names no trainable parameter")
        _check_tensor(ACCUM + name, value, expected[name])
    if counters[MICRO] >= layout.accumulation_steps:
        raise CheckpointError(f"state_dict entry {MICRO!r} = {counters[MICRO]} needs gradient_accumulation_steps > "
                              f"{counters[MICRO]} (this model accumulates {layout.accumulation_steps})")
    if extras[SCALER]:
        if set(extras[SCALER]) != {"scale", "growth"}:
            raise CheckpointError(f"loss-scaler state has {sorted(extras[SCALER])}, expected ['growth', 'scale']")
        for key in ("scale", "growth"):
            _check_tensor(SCALER + key, extras[SCALER][key], ((), torch.float32))
        if not extras[SCALER]["scale"].item() > 0:
            raise CheckpointError(f"state_dict entry {SCALER}scale must be > 0")
    for device, value in extras[RNG].items():
        if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
            raise CheckpointError(f"state_dict entry {RNG + device!r} must be a generator state (a 1-d uint8 tensor)")


def _count(key: str, value: Any) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CheckpointError(f"state_dict entry {key!r} must be a count >= 0, got {value!r}")
    return value


def _lr(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise CheckpointError(f"state_dict entry {LR!r} must be a finite learning rate >= 0, got {value!r}")
    return float(value)


def apply_checkpoint(checkpoint: Checkpoint, module: torch.nn.Module, train: TrainState, strict: bool = True) -> None:
    """Copy a checked ``checkpoint`` into ``module`` and ``train`` (method state is loaded by the caller first).
    ``strict``: the training state is replaced; otherwise what the checkpoint lacks is kept."""
    with torch.no_grad():
        module.load_state_dict(checkpoint.module, strict=False)
    train.step, train.micro, train.skipped = (checkpoint.counters[k] for k in COUNTERS)
    train.lr = checkpoint.lr
    for attr, values in (("accum", checkpoint.accum), ("scaler", checkpoint.scaler), ("rng", checkpoint.rng)):
        copies = {k: v.detach().clone() for k, v in values.items()}
        setattr(train, attr, copies if strict else {**getattr(train, attr), **copies})
    slots = {n: {k: v.detach().clone() for k, v in s.items()} for n, s in checkpoint.slots.items()}
    train.slots = slots if strict else {**train.slots, **slots}
