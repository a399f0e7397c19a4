"""``graphopt.optim``: the extension point for fused optimizer methods, and learning-rate schedules.

An optimizer is a training-stage method that writes only its per-parameter rule: ``init_state``
(the state tensors of one parameter) and ``update`` (the in-place update from its gradient). graphopt
calls ``update`` for each trainable parameter inside the traced training step, so the update becomes
part of the training graph, is scheduled right after that parameter's gradient exists
(:mod:`graphopt.train.schedule`) and compiles with the rest of the step. Hyperparameters arrive as 0-d
float64 tensors in ``hyper`` (``hyper["lr"]``, ``hyper["step"]`` = the 1-based step number), so changing
them (``m.set_lr``, ``m.set_lr_schedule``) never recompiles. Shared update rules (AdamW's step,
Newton–Schulz and its variants) are in :mod:`graphopt.optim.functional`; the Muon family's frame (a matrix
rule for ≥2-D weights, AdamW for the rest) is :class:`graphopt.optim.matrix.MatrixOptimizer`.

Every optimizer gets two options from this base class without declaring them:

- ``groups={glob: {option: value}}``: per-parameter-group options. Each glob is matched
  (``fnmatch``) against the parameter names of ``m.named_parameters()``; every matching group applies,
  in the order given, later ones overriding earlier ones. A group ``lr`` is relative to the base ``lr``
  (the parameter's lr is ``current_lr · group_lr / lr``), so schedules and ``set_lr`` scale every group.
  ``"adamw(lr=1e-3, groups={'*.bias': {'weight_decay': 0}})"``.
- ``max_grad_norm=None``: clip the gradients by their global 2-norm first, as
  ``torch.nn.utils.clip_grad_norm_``: ``g ← g · min(1, max_norm / (‖(‖g_1‖, …, ‖g_n‖)‖ + 1e-6))``.
  The norm needs every gradient before any update, so with clipping all gradients are alive at once
  (one parameter-sized buffer per parameter); without it each gradient dies right after its update.

Sharded training (``graphopt.compile(..., process_group=..., sharding="grad_op" | "full")``, see
``graphopt.distributed``): each rank holds rows ``[r·k, (r+1)·k)`` of every parameter and of the slots
:meth:`Optimizer.row_slots` names (by default, those of the parameter's shape), and the step calls
:meth:`Optimizer.update_shard` with those rows and a :class:`graphopt.distributed.Shard`. An optimizer whose
rule acts entry by entry sets ``elementwise = True`` and runs ``update`` on the rows as they are (sgd,
adamw); otherwise the default gathers the parameter, gradient and row slots, runs ``update`` on the full
tensors on every rank and keeps this rank's rows — correct for any rule, at the cost of full-size
temporaries and three all-gathers; a rule can do better by overriding ``update_shard`` (muon gathers only its
momentum direction, as Moonlight's distributed Muon; dion works on the rows, as its paper shows).

Example (Lion, Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms":
``c = β1·m + (1−β1)·g; p ← p·(1 − lr·wd) − lr·sign(c); m ← β2·m + (1−β2)·g``)::

    class Lion(graphopt.optim.Optimizer):
        name = "lion"
        def __init__(self, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
            self.lr, self.betas, self.weight_decay = lr, betas, weight_decay
        def init_state(self, name, param):
            return {"exp_avg": torch.zeros_like(param)}
        def update(self, name, param, grad, state, hyper):
            lr, m = hyper["lr"].to(param.dtype), state["exp_avg"]
            direction = torch.sign(self.betas[0] * m + (1 - self.betas[0]) * grad)
            param.mul_(1 - lr * self.weight_decay).sub_(lr * direction)
            m.mul_(self.betas[1]).add_(grad, alpha=1 - self.betas[1])

    @graphopt.hookimpl
    def graphopt_register_methods(register):
        register(Lion)
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from graphopt.errors import OptionError
from graphopt.method import Method, Option
from graphopt.train.state import LrSchedule

if TYPE_CHECKING:
    from graphopt.context import MethodContext
    from graphopt.distributed import Shard

COMMON_OPTIONS: tuple[Option, ...] = (
    Option("groups", "dict[str, dict[str, Any]] | None", None),
    Option("max_grad_norm", "float | None", None),
)


class Optimizer(Method):
    """Base class of optimizer methods: subclasses set ``name``, take ``lr`` and write the rule.

    ``init_state`` and ``update`` are the extension point; graphopt calls them through
    :meth:`state_for` and :meth:`step_parameter`, which resolve the parameter's group options first.
    Its :meth:`apply` makes it the compiled model's update rule (``ctx.set_optimizer``).
    """

    stage: ClassVar[str] = "training"
    elementwise: ClassVar[bool] = False  # the update of some rows of a parameter is those rows of its update
    lr: float
    groups: dict[str, dict[str, Any]] | None = None
    max_grad_norm: float | None = None

    # -- the rule (override these) --------------------------------------------------------------
    def init_state(self, name: str, param: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state tensors of parameter ``name`` before the first step (e.g. zero momentum)."""
        return {}

    def update(self, name: str, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
               hyper: Mapping[str, torch.Tensor]) -> None:
        """Update ``param`` (and ``state``) in place from ``grad``."""
        raise NotImplementedError(f"optimizer {self.name!r} does not implement update()")

    def row_slots(self, name: str, shape: tuple[int, ...], state: Mapping[str, torch.Tensor]) -> set[str]:
        """The slots of ``state`` laid out row by row like parameter ``name`` (full shape ``shape``), which
        sharding splits with it; by default those of the parameter's shape. The others stay whole on every rank."""
        return {k for k, v in state.items() if tuple(v.shape) == tuple(shape)}

    def update_shard(self, name: str, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
                     hyper: Mapping[str, torch.Tensor], shard: Shard) -> None:
        """Update this rank's rows ``param`` (and ``state``) in place from the averaged gradient's rows ``grad``.

        ``elementwise`` rules run :meth:`update` on the rows; otherwise the parameter, gradient and row slots
        are gathered, :meth:`update` runs on the full tensors and this rank's rows are kept."""
        if self.elementwise:
            self.update(name, param, grad, state, hyper)
            return
        full = shard.gather(param)
        slots = {k: shard.gather(v) if k in shard.row_slots else v for k, v in state.items()}
        self.update(name, full, shard.gather(grad), slots, hyper)
        param.copy_(shard.local(full))
        for key in shard.row_slots:
            state[key].copy_(shard.local(slots[key]))

    # -- options shared by every optimizer --------------------------------------------------------
    @classmethod
    def options(cls) -> tuple[Option, ...]:
        own = super().options()
        names = {o.name for o in own}
        return (*own, *(o for o in COMMON_OPTIONS if o.name not in names))

    @classmethod
    def rule_options(cls) -> tuple[Option, ...]:
        """The options of the rule itself (those a group may override)."""
        common = {o.name for o in COMMON_OPTIONS}
        return tuple(o for o in cls.options() if o.name not in common)

    @classmethod
    def create(cls, options: Mapping[str, Any]) -> Optimizer:
        common = {o.name for o in COMMON_OPTIONS}
        method = super().create({k: v for k, v in options.items() if k not in common})
        method.configure(groups=options.get("groups"), max_grad_norm=options.get("max_grad_norm"))
        return method

    def configure(self, groups: Mapping[str, Mapping[str, Any]] | None = None,
                  max_grad_norm: float | None = None) -> None:
        """Set and validate the shared options (``create`` calls this; call it when building by hand)."""
        self.max_grad_norm = max_grad_norm
        if max_grad_norm is not None:
            ok = isinstance(max_grad_norm, (int, float)) and not isinstance(max_grad_norm, bool)
            self.check(ok and math.isfinite(max_grad_norm) and max_grad_norm > 0, "max_grad_norm",
                       "use a number > 0, or None for no clipping")
            self.max_grad_norm = float(max_grad_norm)
        self.groups = None
        self._group_rules: dict[tuple[str, ...], Optimizer] = {}
        if groups is None:
            return
        self.groups = groups  # for the error message
        self.check(isinstance(groups, Mapping) and all(isinstance(k, str) for k in groups), "groups",
                   "use a dict {glob: {option: value}}, e.g. groups={'*.bias': {'weight_decay': 0}}")
        allowed = {o.name for o in self.rule_options()}
        for glob, overrides in groups.items():
            if not isinstance(overrides, Mapping):
                raise OptionError(f"method {self.name!r}: option groups[{glob!r}] must be a dict of options, "
                                  f"got {overrides!r}")
            for key in overrides:
                if key not in allowed:
                    raise OptionError(f"method {self.name!r}: option groups[{glob!r}] sets {key!r}, which a group "
                                      f"cannot set; group options are: {', '.join(sorted(allowed))}")
            if "lr" in overrides and not self.lr > 0:
                raise OptionError(f"method {self.name!r}: option groups[{glob!r}] sets lr, which is relative to "
                                  f"the base lr; use lr > 0 (got lr={self.lr!r})")
            self._rule_for((glob,))  # validates the merged options now, not at the first step
        self.groups = {k: dict(v) for k, v in groups.items()}

    def _rule_for(self, globs: tuple[str, ...]) -> Optimizer:
        if not globs:
            return self
        rule = self._group_rules.get(globs)
        if rule is None:
            merged = {o.name: getattr(self, o.name) for o in self.rule_options() if hasattr(self, o.name)}
            for glob in globs:
                merged.update(self.groups[glob] if self.groups else {})
            try:
                rule = super(Optimizer, type(self)).create(merged)
            except OptionError as err:
                raise OptionError(f"in groups[{' / '.join(map(repr, globs))}]: {err}") from err
            rule.configure()
            self._group_rules[globs] = rule
        return rule

    def group_of(self, name: str) -> tuple[str, ...]:
        """The globs of ``groups`` that match parameter ``name``, in the order given."""
        return tuple(g for g in (self.groups or {}) if fnmatch.fnmatchcase(name, g))

    def rule(self, name: str) -> Optimizer:
        """The optimizer with parameter ``name``'s group options applied (``self`` when no group matches)."""
        return self._rule_for(self.group_of(name))

    def check_groups(self, names: Iterable[str]) -> None:
        """Every group glob must match at least one trainable parameter."""
        names = list(names)
        for glob in self.groups or {}:
            if not any(fnmatch.fnmatchcase(n, glob) for n in names):
                shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
                raise OptionError(f"method {self.name!r}: option groups key {glob!r} matches no trainable "
                                  f"parameter; the parameters are: {shown}")

    # -- what the training step calls ------------------------------------------------------------
    def state_for(self, name: str, param: torch.Tensor) -> dict[str, torch.Tensor]:
        """``init_state`` of parameter ``name`` under its group options."""
        return self.rule(name).init_state(name, param)

    def apply(self, gm: torch.fx.GraphModule, ctx: MethodContext) -> None:
        """Become the update rule of every trainable parameter; every ``groups`` glob must match one."""
        self.check_groups(ctx.trainable_parameters())
        ctx.set_optimizer(self)

    def step_parameter(self, name: str, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
                       hyper: Mapping[str, torch.Tensor], shard: Shard | None = None) -> None:
        """``update`` of parameter ``name`` under its group options (a group lr scales ``hyper["lr"]``);
        ``update_shard`` when ``shard`` says ``param`` is this rank's rows of it."""
        rule = self.rule(name)
        if rule is not self and rule.lr != self.lr:
            hyper = {**hyper, "lr": hyper["lr"] * (rule.lr / self.lr)}
        if shard is None:
            rule.update(name, param, grad, state, hyper)
        else:
            rule.update_shard(name, param, grad, state, hyper, shard)

    def spec(self) -> str:
        text = super().spec()
        return text.replace(", groups=None", "").replace(", max_grad_norm=None", "")


def cosine_with_warmup(lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> LrSchedule:
    """Linear warm-up then cosine decay (Loshchilov & Hutter 2017, SGDR, without restarts).

    For the 1-based step t: ``lr·t/W`` for ``t ≤ W``; then
    ``min_lr + (lr − min_lr)·(1 + cos(π·(t − W)/(T − W)))/2``, held at ``min_lr`` after ``T``.
    """
    if not (lr >= 0 and 0 <= min_lr <= lr):
        raise OptionError(f"cosine_with_warmup: need lr >= min_lr >= 0, got lr={lr!r}, min_lr={min_lr!r}")
    if not (isinstance(warmup_steps, int) and isinstance(total_steps, int) and 0 <= warmup_steps < total_steps):
        raise OptionError(f"cosine_with_warmup: need integers 0 <= warmup_steps < total_steps, got "
                          f"warmup_steps={warmup_steps!r}, total_steps={total_steps!r}")

    def schedule(step: int) -> float:
        if step <= warmup_steps:
            return lr * step / warmup_steps
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return schedule
