"""The training state of a compiled model, held in one place: steps done, the learning rate and its
schedule, the optimizer's per-parameter slots, the step's own random-number generator, gradient
accumulation buffers and the loss scale of ``16-mixed`` precision.

The step draws its randomness (dropout masks) from its own generator state, seeded from the global
generator when the model is compiled and saved in ``m.state_dict()``, so a resumed run draws the same
masks. The learning rate starts at the optimizer's ``lr`` option. ``m.set_lr`` sets it; with a schedule
(``m.set_lr_schedule(fn)``) each step sets it to ``fn(step)`` first (1-based step). It reaches the step
graph as the 0-d tensor ``hyper["lr"]``, so changing it never recompiles.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
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
    """``step``: optimizer steps done; ``micro``: micro-batches accumulated since the last one; ``skipped``:
    steps skipped as non-finite; ``lr``: the lr of the next step (None without an optimizer); ``lr_schedule``:
    step → lr, applied before each step; ``slots``: optimizer state by parameter name; ``accum``: gradient
    accumulation buffers by parameter name; ``scaler``: the loss scale and its growth counter (16-mixed);
    ``rng``: the step generator's state by device (``"cpu"``, ``"cuda:0"``, ...)."""

    lr: float | None = None
    step: int = 0
    micro: int = 0
    skipped: int = 0
    lr_schedule: LrSchedule | None = None
    slots: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    accum: dict[str, torch.Tensor] = field(default_factory=dict)
    scaler: dict[str, torch.Tensor] = field(default_factory=dict)
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        self.rng.setdefault("cpu", _seeded_state("cpu", self.seed))

    @contextlib.contextmanager
    def step_rng(self, devices: Iterable[torch.device]) -> Iterator[None]:
        """Run the block on the step's own generator (on the CPU and each accelerator in ``devices``); the
        global generators are as they were afterwards."""
        accelerators = sorted({d for d in devices if d.type != "cpu"}, key=str)
        kinds = {d.type for d in accelerators}
        kind = next(iter(kinds)) if len(kinds) == 1 else "cuda"
        with torch.random.fork_rng(devices=[d.index or 0 for d in accelerators], device_type=kind):
            for name in map(str, accelerators):
                if name not in self.rng:
                    self.rng[name] = _seeded_state(name, self.seed)
            torch.set_rng_state(self.rng["cpu"])
            for device in accelerators:
                torch.get_device_module(device.type).set_rng_state(self.rng[str(device)], device)
            yield
            self.rng["cpu"] = torch.get_rng_state()
            for device in accelerators:
                self.rng[str(device)] = torch.get_device_module(device.type).get_rng_state(device)

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


def _seeded_state(device: str, seed: int) -> torch.Tensor:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator.get_state()
