"""The training state of a compiled model, held in one place: steps done, the learning rate and its
schedule, and the optimizer's per-parameter slots.

The learning rate starts at the optimizer's ``lr`` option. ``m.set_lr`` sets it; with a schedule
(``m.set_lr_schedule(fn)``) each step sets it to ``fn(step)`` first (1-based step). It reaches the step
graph as the 0-d tensor ``hyper["lr"]``, so changing it never recompiles.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from graphopt.errors import OptionError

LrSchedule = Callable[[int], float]


def checked_lr(value: object, where: str) -> float:
    """``value`` as a float if it is a finite number >= 0 (a 1-element tensor counts), else ``OptionError``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise OptionError(f"{where}: the learning rate must be a finite number >= 0, got {value!r}")
    return float(value)


@dataclass
class TrainState:
    """``step``: training steps done; ``lr``: the lr of the next step (None without an optimizer);
    ``lr_schedule``: step → lr, applied before each step; ``slots``: optimizer state by parameter name."""

    lr: float | None = None
    step: int = 0
    lr_schedule: LrSchedule | None = None
    slots: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def set_lr(self, lr: float) -> None:
        self.lr = checked_lr(lr, "set_lr")

    def set_lr_schedule(self, schedule: LrSchedule | None) -> None:
        if schedule is not None and not callable(schedule):
            raise OptionError(f"set_lr_schedule takes a callable step -> lr (or None), got {schedule!r}")
        self.lr_schedule = schedule

    def lr_for(self, step: int) -> float:
        """The lr of training step ``step`` (1-based): ``lr_schedule(step)`` when set, else the current lr."""
        if self.lr_schedule is None:
            return self.lr
        return checked_lr(self.lr_schedule(step), f"the lr schedule at step {step}")
