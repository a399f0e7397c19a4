"""The training-loop options of ``graphopt.compile``, validated in one place, and how ``m.step``'s
arguments split into the model's inputs and the loss target.

| option | values | meaning |
|---|---|---|
| ``gradient_accumulation_steps`` | int ≥ 1 | each ``m.step`` is one micro-batch; every N-th updates |
| ``precision`` | ``"32"``, ``"bf16-mixed"``, ``"16-mixed"`` | autocast in the step; float32 weights and state |
| ``on_nonfinite`` | ``"raise"``, ``"skip"``, ``"apply"`` | a step with a non-finite loss or gradient |
| ``trainable`` | module or parameter globs | kept trainable beside adapters (PEFT's ``modules_to_save``) |
| ``checkpoint_blocks`` | None, True, or module globs | activation checkpointing of residual blocks |
| ``process_group`` | a ``torch.distributed`` group | data parallel training (``graphopt.distributed``) |
| ``sharding`` | ``"none"``, ``"grad_op"``, ``"full"`` | held whole per rank: all (DDP), params (ZeRO-2), none (FSDP) |
| ``bucket_mb`` | number ≥ 0 (25) | MiB of gradients per collective (0: one tensor each) |
| ``sync_buffers`` | bool (False) | broadcast the buffers from the first rank before each step's forward |

``on_nonfinite`` defaults to ``"raise"`` (``"skip"`` under 16-mixed). ``"apply"`` is the fastest: each
parameter's update runs as soon as its gradient exists and the gradient dies there. ``"raise"`` and
``"skip"`` need every gradient first, to know that all are finite.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from graphopt.distributed import SHARDINGS, check_process_group
from graphopt.errors import OptionError
from graphopt.inputs import CallInputs

PRECISIONS = ("32", "bf16-mixed", "16-mixed")
NONFINITE = ("raise", "skip", "apply")


@dataclass(frozen=True)
class TrainingOptions:
    """The validated training-loop options (see the module docstring)."""

    gradient_accumulation_steps: int = 1
    precision: str = "32"
    on_nonfinite: str = "raise"
    trainable: tuple[str, ...] = ()
    checkpoint_blocks: bool | tuple[str, ...] | None = None
    process_group: Any = None
    sharding: str = "none"
    bucket_mb: float = 25.0
    sync_buffers: bool = False

    @property
    def guarded(self) -> bool:
        """Whether updates wait for every gradient and apply only when all are finite."""
        return self.on_nonfinite != "apply" or self.precision == "16-mixed"

    @classmethod
    def create(cls, gradient_accumulation_steps: int = 1, precision: str = "32", on_nonfinite: str | None = None,
               trainable: Any = (), checkpoint_blocks: Any = None, process_group: Any = None, sharding: str = "none",
               bucket_mb: float = 25.0, sync_buffers: bool = False) -> TrainingOptions:
        """Check each option; ``OptionError`` names the option and what is allowed."""
        steps = gradient_accumulation_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise OptionError(f"gradient_accumulation_steps={steps!r} is invalid; use an integer >= 1")
        if precision not in PRECISIONS:
            raise OptionError(f"precision={precision!r} is invalid; use one of {', '.join(map(repr, PRECISIONS))}")
        if on_nonfinite is None:
            on_nonfinite = "skip" if precision == "16-mixed" else "raise"
        if on_nonfinite not in NONFINITE:
            raise OptionError(f"on_nonfinite={on_nonfinite!r} is invalid; use one of {', '.join(map(repr, NONFINITE))}")
        if precision == "16-mixed" and on_nonfinite == "apply":
            raise OptionError("on_nonfinite='apply' cannot go with precision='16-mixed': dynamic loss scaling skips "
                              "the steps whose scaled gradients overflow; use 'skip' or 'raise'")
        globs = _globs(trainable, "trainable")
        blocks = checkpoint_blocks if checkpoint_blocks in (None, True, False) else _globs(checkpoint_blocks,
                                                                                           "checkpoint_blocks")
        if process_group is not None:
            check_process_group(process_group)
        _check_parallel(process_group, sharding, bucket_mb, sync_buffers)
        return cls(steps, precision, on_nonfinite, globs, blocks or None, process_group, sharding, float(bucket_mb),
                   sync_buffers)


def _check_parallel(process_group: Any, sharding: Any, bucket_mb: Any, sync_buffers: Any) -> None:
    if sharding not in SHARDINGS:
        raise OptionError(f"sharding={sharding!r} is invalid; use one of {', '.join(map(repr, SHARDINGS))}")
    number = isinstance(bucket_mb, (int, float)) and not isinstance(bucket_mb, bool)
    if not number or not math.isfinite(bucket_mb) or bucket_mb < 0:
        raise OptionError(f"bucket_mb={bucket_mb!r} is invalid; use a number of MiB >= 0 (25, DDP's default; 0 "
                          "reduces each gradient on its own)")
    if not isinstance(sync_buffers, bool):
        raise OptionError(f"sync_buffers={sync_buffers!r} is invalid; use True or False")
    if process_group is None and (sharding != "none" or sync_buffers):
        option = f"sharding={sharding!r}" if sharding != "none" else "sync_buffers=True"
        raise OptionError(f"{option} needs data parallel training: pass process_group= (e.g. "
                          "torch.distributed.group.WORLD after torch.distributed.init_process_group)")


def _globs(value: Any, option: str) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(g, str) and g for g in items):
        raise OptionError(f"{option}={value!r} is invalid; use a module or parameter glob or a list of them, e.g. "
                          f"{option}=['classifier', '*.bias']")
    return tuple(items)


def step_inputs(args: tuple[Any, ...], kwargs: Mapping[str, Any], has_loss_fn: bool) -> tuple[CallInputs, Any]:
    """``m.step``'s arguments as (model inputs, target). With a ``loss_fn``: ``labels=`` is the target if given,
    else the last positional argument. Without one the model computes its own loss: everything is an input
    and the target is None."""
    kwargs = dict(kwargs)
    if not has_loss_fn:
        return CallInputs(tuple(args), kwargs), None
    if "labels" in kwargs:
        target = kwargs.pop("labels")
        return CallInputs(tuple(args), kwargs), target
    if len(args) < 1 or (len(args) < 2 and not kwargs):
        raise TypeError("step(*inputs, target) needs the inputs and the target (last), or step(**batch) with "
                        "labels=...")
    return CallInputs(tuple(args[:-1]), kwargs), args[-1]
