"""``sora``: Sparse Low-rank Adaptation (Ding et al. 2023, "Sparse Low-rank Adaptation of Pre-trained
Language Models", EMNLP 2023, arXiv:2311.11696).

Each targeted linear layer ``y = x Wᵀ + b`` (``W ∈ R^{out×in}``, frozen) gets a gated low-rank branch

    y = x Wᵀ + b + (alpha/r) · ((x Aᵀ) ⊙ g) Bᵀ,

``A ∈ R^{r×in}`` (``<path>.sora_A``, Kaiming-uniform as LoRA), ``B ∈ R^{out×r}`` (``<path>.sora_B``,
zeros) and the gate ``g ∈ R^r`` (``<path>.sora_gate``, ones). In the training step, right after the
optimizer updated a gate, the proximal operator of the L1 penalty ``ξ‖g‖₁`` is applied in place (the
proximal gradient method of the paper, Eq. 4–5):

    g ← sign(g) · max(|g| − lr·ξ, 0)        (soft-threshold; ``lr`` = the optimizer's current lr)

so gates that reach zero stay exactly zero unless a gradient step larger than the threshold moves them
out again. ``ξ`` is ``sparse_lambda``, or with ``lambda_schedule`` a per-step value raised from
``sparse_lambda`` to ``max_lambda`` over ``lambda_steps`` steps (the paper's sparsifying scheduler,
Sec. 3.3). With ``t`` = steps done before the current one and ``p = min(t / lambda_steps, 1)``:

- ``"linear"``:     ``ξ = ξ₀ + p·(ξ₁ − ξ₀)``
- ``"log-linear"``: ``ξ = ξ₀·(ξ₁/ξ₀)^p`` (log ξ linear in the step; needs ``sparse_lambda > 0``)
- ``"exp"``:        ``ξ = ξ₀ + (ξ₁ − ξ₀)·(1 − e^{−5p})/(1 − e^{−5})`` (fast rise, then saturating)

``ξ`` reaches the step graph as the input ``hyper["sora.sparse_lambda"]``, so a schedule never recompiles.

The compiled model gains ``m.sora_ranks()`` → ``{layer path: (active_rank, r)}`` (active = non-zero
gates) and ``m.prune()``, which removes the ranks whose gate is exactly zero, in place: ``sora_A (r′,in)``,
``sora_B (out,r′)``, ``sora_gate (r′,)``, the scale stays ``alpha/r``, so the outputs are unchanged; a
layer with no active rank loses its branch. It returns the (same, pruned) model. Export with
``merge=True`` folds ``W ← W + (alpha/r)·B diag(g) A``; with ``merge=False`` the file holds plain LoRA
factors ``A′ = (alpha/r)·diag(g)A`` and ``B′`` on the active ranks only, no gate (``lora``'s branch). The
factors' init and the plain branch are ``graphopt.builtin.lora``'s.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import torch

import graphopt
from graphopt.builtin.lora import lora_delta, lora_factors
from graphopt.rewrite.adapters import fold_output_deltas, insert_output_delta, remove_output_delta, weight_groups
from graphopt.rewrite.layers import check_rank

SCHEDULES = ("linear", "log-linear", "exp")
_EXP_RATE = 5.0
_PARAM_RANK_DIM = {"sora_A": 0, "sora_B": 1, "sora_gate": 0}


def sora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gate: torch.Tensor, scale: float) -> torch.Tensor:
    """The gated low-rank branch ``scale · ((x Aᵀ) ⊙ g) Bᵀ`` (scale applied on the rank-r side: cheaper)."""
    return ((x @ A.t()) * (gate * scale)) @ B.t()


def sora_fold_delta(A: torch.Tensor, B: torch.Tensor, gate: torch.Tensor, scale: float) -> torch.Tensor:
    """The branch as a weight delta ``scale · B diag(g) A`` in ``(out, in)`` layout."""
    return (B * (gate * scale)) @ A


def soft_threshold(value: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``sign(v) · max(|v| − t, 0)``, the proximal operator of ``t·‖·‖₁``."""
    return torch.sign(value) * torch.clamp(value.abs() - threshold, min=0)


def lambda_at(step: int, sparse_lambda: float, schedule: str | None = None, max_lambda: float | None = None,
              lambda_steps: int | None = None) -> float:
    """ξ used by training step ``step`` (1-based) under ``schedule`` (see the module docstring)."""
    if schedule is None:
        return float(sparse_lambda)
    p = min(max(step - 1, 0) / lambda_steps, 1.0)
    lo, hi = float(sparse_lambda), float(max_lambda)
    if schedule == "linear":
        return lo + p * (hi - lo)
    if schedule == "log-linear":
        return lo * (hi / lo) ** p
    if schedule == "exp":
        return lo + (hi - lo) * (1 - math.exp(-_EXP_RATE * p)) / (1 - math.exp(-_EXP_RATE))
    raise ValueError(f"unknown lambda_schedule {schedule!r}")


class SoRA(graphopt.Method):
    """Sparse low-rank adaptation (Ding et al. 2023): ``y = base(x) + (alpha/r)·((x Aᵀ) ⊙ g) Bᵀ`` with the
    proximal gate step ``g ← sign(g)·max(|g| − lr·ξ, 0)`` after each optimizer update of ``g``.

    Options: ``r`` (initial rank), ``alpha`` (scale ``alpha/r``), ``targets`` (module-path globs; all
    linear layers when None), ``sparse_lambda`` (ξ), ``lambda_schedule`` (None, "linear", "log-linear",
    "exp": raise ξ to ``max_lambda`` over ``lambda_steps`` steps). Adds ``m.sora_ranks()`` and ``m.prune()``.
    """

    name = "sora"
    stage = "forward"

    def __init__(self, r: int = 8, alpha: float = 16, targets: str | list[str] | tuple[str, ...] | None = None,
                 sparse_lambda: float = 1e-3, lambda_schedule: str | None = None, max_lambda: float | None = None,
                 lambda_steps: int | None = None) -> None:
        self.r, self.alpha, self.targets = r, alpha, targets
        self.sparse_lambda, self.lambda_schedule = sparse_lambda, lambda_schedule
        self.max_lambda, self.lambda_steps = max_lambda, lambda_steps
        self.check(r >= 1, "r", "use an integer r >= 1")
        self.check(alpha > 0, "alpha", "use alpha > 0 (the branch is scaled by alpha/r)")
        self.check(math.isfinite(sparse_lambda) and sparse_lambda >= 0, "sparse_lambda",
                   "use a finite sparse_lambda >= 0 (0 turns SoRA into a plain LoRA with a trainable gate)")
        self.check(lambda_schedule is None or lambda_schedule in SCHEDULES, "lambda_schedule",
                   f"use None or one of {', '.join(repr(s) for s in SCHEDULES)}")
        if lambda_schedule is None:
            self.check(max_lambda is None, "max_lambda", "max_lambda is only used with a lambda_schedule")
            self.check(lambda_steps is None, "lambda_steps", "lambda_steps is only used with a lambda_schedule")
        else:
            self.check(max_lambda is not None and math.isfinite(max_lambda) and max_lambda >= sparse_lambda,
                       "max_lambda", f"a lambda_schedule needs a finite max_lambda >= sparse_lambda={sparse_lambda!r}")
            self.check(lambda_steps is not None and lambda_steps >= 1, "lambda_steps",
                       "a lambda_schedule needs lambda_steps >= 1 (steps over which ξ rises to max_lambda)")
            if lambda_schedule == "log-linear":
                self.check(sparse_lambda > 0, "sparse_lambda", "the 'log-linear' schedule needs sparse_lambda > 0")

    def apply(self, gm: torch.fx.GraphModule, ctx: graphopt.MethodContext) -> None:
        """A gated branch on every targeted layer; the proximal gate step, ξ, export, ``prune`` to ``ctx``."""
        gates = []
        layers = ctx.select(self.targets)
        check_rank(self.name, self.r, layers)
        for calls in weight_groups(ctx, layers):  # a shared weight: one gated branch, added at every call
            layer = calls[0]
            a, b = lora_factors(layer, self.r, ctx.parameter(layer.weight.target))  # LoRA's init (lora.py)
            names = [
                ctx.add_parameter(layer.path, "A", a),
                ctx.add_parameter(layer.path, "B", b),
                ctx.add_parameter(layer.path, "gate", torch.ones_like(a[:, 0])),
            ]
            gates.append(names[2])
            for call in calls:
                insert_output_delta(ctx, call, sora_delta, names, scale=self.alpha / self.r)
        xi = ctx.add_hyperparameter("sparse_lambda", functools.partial(
            lambda_at, sparse_lambda=self.sparse_lambda, schedule=self.lambda_schedule, max_lambda=self.max_lambda,
            lambda_steps=self.lambda_steps))
        ctx.add_post_update(gates, functools.partial(_proximal_gate_step, xi))
        ctx.add_export_pass(lambda export_gm: fold_output_deltas(export_gm, sora_delta, sora_fold_delta), merge=True)
        ctx.add_export_pass(_unmerged, merge=False)
        ranks = Ranks(ctx, self.r, {layer_path_of(gate): list(range(self.r)) for gate in gates})
        ctx.add_model_function("sora_ranks", ranks.report)
        ctx.add_model_function("prune", ranks.prune)
        ctx.add_state(ranks.save, ranks.load, ranks.shapes)


def _proximal_gate_step(xi: str, gate: torch.Tensor, hyper: Mapping[str, torch.Tensor]) -> None:
    """``g ← sign(g)·max(|g| − lr·ξ, 0)`` in place, right after the optimizer updated the gate."""
    gate.copy_(soft_threshold(gate, (hyper["lr"] * hyper[xi]).to(gate.dtype)))


def _unmerged(gm: torch.fx.GraphModule) -> None:
    """Export with ``merge=False``: plain LoRA factors ``A′ = scale·diag(g)A`` and ``B′`` on the active
    ranks (``g ≠ 0``), so the file holds no gate and no inactive rank (one zero rank if none is active)."""
    done: dict[str, torch.Tensor] = {}  # a shared weight's branch (one per call) is rewritten once
    for node in _branches(gm):
        x, a_node, b_node, gate_node = node.args
        if a_node.target in done:
            node.target, node.args, node.kwargs = lora_delta, (x, a_node, b_node), {"scale": 1.0}
            continue
        done[a_node.target] = gate_node
        A, B, gate = (gm.get_parameter(n.target).detach() for n in (a_node, b_node, gate_node))
        active = gate != 0
        if not bool(active.any()):
            active = torch.arange(gate.numel(), device=gate.device) == 0
            gate = torch.zeros_like(gate)
        scaled = gate * node.kwargs["scale"]
        for attr_node, value in ((a_node, (A * scaled[:, None])[active]), (b_node, B[:, active])):
            owner, _, attr = attr_node.target.rpartition(".")
            setattr(gm.get_submodule(owner), attr, torch.nn.Parameter(value.clone(), requires_grad=False))
        node.target, node.args, node.kwargs = lora_delta, (x, a_node, b_node), {"scale": 1.0}
    gm.graph.eliminate_dead_code()
    gm.recompile()


# -- model functions ---------------------------------------------------------------------------------
def _branches(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is sora_delta]


def _branch_calls(gm: torch.fx.GraphModule) -> dict[str, list[torch.fx.Node]]:
    """Every branch's nodes by the layer path its parameters live under (a shared weight: one node per call)."""
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in _branches(gm):
        calls.setdefault(layer_path_of(node.args[3].target), []).append(node)
    return calls


def layer_path_of(gate: str) -> str:
    """The layer path of a gate parameter ``<path>.sora_gate``."""
    return gate.rpartition(".")[0]


class Ranks:
    """Which of the ``r`` ranks of each layer's branch are still there: ``kept[path]`` lists their original
    indices (all of them until ``prune``; none once the branch is removed). Saved with the model, so a pruned
    model's checkpoint loads into a fresh one: loading prunes it to the same ranks first."""

    def __init__(self, ctx: graphopt.MethodContext, r: int, kept: dict[str, list[int]]) -> None:
        self.ctx, self.r, self.kept = ctx, r, kept

    def report(self) -> dict[str, tuple[int, int]]:
        """``m.sora_ranks()`` → ``{layer path: (active_rank, r)}``: active = gates not exactly zero; ``r`` the
        configured rank. A layer whose branch ``prune()`` removed reports ``(0, r)``."""
        ranks = {path: (int(torch.count_nonzero(self.ctx.parameter(calls[0].args[3].target))), self.r)
                 for path, calls in _branch_calls(self.ctx.graph_module).items()}
        return {path: ranks.get(path, (0, self.r)) for path in self.kept}

    def prune(self) -> None:
        """``m.prune()``: remove the ranks whose gate is exactly zero, in place (returns the model).

        For each branch with active ranks ``K``: ``sora_A ← A[K]``, ``sora_B ← B[:, K]``, ``sora_gate ← g[K]``
        (new parameters, same names); the optimizer slots shaped like a parameter are sliced the same way, so
        training continues where it was. A branch with no active rank is removed from the graph with its
        parameters. The scale stays ``alpha/r``: outputs are unchanged.
        """
        plan = {}
        for path, calls in _branch_calls(self.ctx.graph_module).items():  # decide first, then change the model
            gate = self.ctx.parameter(calls[0].args[3].target).detach()
            keep = torch.nonzero(gate != 0).flatten().tolist()
            if len(keep) < gate.numel():
                plan[path] = keep
        self._select({path: [self.kept[path][i] for i in keep] for path, keep in plan.items()})

    def _select(self, wanted: Mapping[str, list[int]]) -> None:
        """Keep, per layer, the original ranks ``wanted[path]`` (a subset of those kept now)."""
        gm = self.ctx.graph_module
        branches = _branch_calls(gm)
        for path, keep in wanted.items():
            positions = [self.kept[path].index(i) for i in keep]
            calls = branches[path]
            if not positions:  # every call of a shared branch removed, its parameters once
                names = [name for call in calls for name in remove_output_delta(gm, call)]
                for name in dict.fromkeys(names):
                    self.ctx.remove_parameter(name)
            for qualified in ([] if not positions else [a.target for a in calls[0].args[1:4]]):
                dim = _PARAM_RANK_DIM[qualified.rpartition(".")[2]]
                index = torch.tensor(positions, device=self.ctx.parameter(qualified).device)
                self.ctx.replace_parameter(qualified, self.ctx.parameter(qualified).detach().index_select(dim, index),
                                           slots=lambda slot, dim=dim, index=index: slot.index_select(dim, index))
            self.kept[path] = list(keep)

    def save(self) -> dict[str, Any]:
        return {"kept": {path: list(keep) for path, keep in self.kept.items()}}

    def shapes(self, state: Mapping[str, Any]) -> dict[str, tuple[int, ...] | None]:
        """The shapes of the factors once ``load(state)`` pruned to the saved ranks (None: the branch removed)."""
        saved = self._saved(state)
        shapes: dict[str, tuple[int, ...] | None] = {}
        for path, keep in saved.items():
            if keep == self.kept[path]:
                continue
            a, b = self.ctx.parameter(f"{path}.sora_A"), self.ctx.parameter(f"{path}.sora_B")
            sizes = {"A": (len(keep), a.shape[1]), "B": (b.shape[0], len(keep)), "gate": (len(keep),)}
            shapes.update({f"{path}.sora_{k}": (v if keep else None) for k, v in sizes.items()})
        return shapes

    def load(self, state: Mapping[str, Any]) -> None:
        self._select({path: keep for path, keep in self._saved(state).items() if keep != self.kept[path]})

    def _saved(self, state: Mapping[str, Any]) -> dict[str, list[int]]:
        kept = state.get("kept")
        if not isinstance(kept, Mapping) or set(kept) != set(self.kept):
            raise ValueError(f"the saved ranks are for layers {sorted(kept or {})}, this model's sora is on "
                             f"{sorted(self.kept)}")
        for path, keep in kept.items():
            if not set(keep) <= set(self.kept[path]):
                raise ValueError(f"layer {path!r} kept ranks {list(keep)} in the checkpoint, but this model has "
                                 f"pruned it to {self.kept[path]} already: load into a model pruned less")
        return {path: list(keep) for path, keep in kept.items()}


@graphopt.hookimpl
def graphopt_register_methods(register):
    register(SoRA)

