"""``layerdrop``: per-step schedules that skip residual blocks, as specialised graphs (no zero masks).

A *block* is a module computing ``x ↦ x + f(x, extras)`` (see :mod:`graphopt.rewrite.blocks`: pre-norm
and post-norm transformer layers, ResNet blocks). Blocks are found on the final forward graph
(:func:`~graphopt.rewrite.blocks.find_blocks`) or named by module-path globs (``blocks="layers.*"``); they
are numbered ``l = 1..L`` in execution order. Each training step draws a graph variant from the schedule:

``progressive`` — Drop-Muon's randomized progressive training (Gruntkowska, Gaponov, Tovmasyan and
    Richtárik 2025, "Drop-Muon: Update Less, Converge Faster", arXiv:2510.02239): a cutoff ``s`` is
    drawn uniformly from the blocks (``s ∈ {0, …, L−1}``, 0-based); the blocks below ``s`` (and whatever
    runs before them, e.g. a stem) get no gradient, no update and keep their optimizer state; backward
    stops at block ``s`` (its input is detached in the graph); the forward still runs every block.
    ``layerdrop(schedule="progressive")`` together with ``muon`` *is* Drop-Muon.
``pld`` — progressive layer dropping (Zhang and He 2020, "Accelerating Training of Transformer-Based
    Language Models with Progressive Layer Dropping", NeurIPS): at step ``t`` (steps done before this
    one) every block is kept independently with probability ``θ(t) = (1 − θ̄)·e^{−γt} + θ̄``
    (``theta`` = θ̄, ``gamma`` = γ).
``stochastic-depth`` — Huang et al. 2016, "Deep Networks with Stochastic Depth" (ECCV): block ``l`` survives
    with ``p_l = 1 − (l/L)(1 − p_L)`` (``p_last`` = p_L). In inference and export each residual add on the
    block's stream becomes ``x + p_l·f(x)``.
``uniform`` — LayerDrop (Fan, Grave and Joulin 2020, "Reducing Transformer Depth on Demand with Structured
    Dropout", ICLR): every block is dropped independently with probability ``p``.

A dropped block is removed from the graph (its output is replaced by its input ``x``: the whole layer is
skipped, for post-norm layers too, as LayerDrop and Drop-Muon do) and costs nothing; its parameters get
no update and their optimizer state is untouched (as ``torch.optim`` skips parameters whose ``.grad`` is
None). ``m(x)``, ``m.eval()`` and export always run
the full model. The draw of step ``t`` is a pure function of ``(seed, t)`` (a ``random.Random`` seeded
with both, :class:`LayerSchedule`), so runs repeat exactly from ``seed``, and ``state_dict`` carries the
seed so a loaded model continues the saved schedule.

Graph variants (each built and compiled on first use, per input shape; the training step keeps the most
recent ``TrainingStep.max_cached_graphs``): ``progressive`` has at most ``L`` (one per cutoff, cutoff 0 being
the full graph); the dropping schedules up to ``2^L`` (one per set of dropped blocks) — with many blocks they
recompile often, so prefer ``backend="eager"`` or few blocks with them.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import graphopt
from graphopt.rewrite.block_edits import detach_input, drop_blocks, scale_branches, trained_parameters
from graphopt.rewrite.blocks import Block, find_blocks, resolve_blocks
from graphopt.rewrite.modes import copy_graph_module

SCHEDULES = ("progressive", "pld", "stochastic-depth", "uniform")


@dataclass
class LayerSchedule:
    """Which blocks each training step runs (or trains): a pure function of ``(seed, step)``.

    ``schedule`` is one of :data:`SCHEDULES`, ``blocks`` the number L of blocks; the other fields are the
    options of the method (see the module docstring for the formulas).
    """

    schedule: str
    blocks: int
    seed: int = 0
    theta: float = 0.5
    gamma: float = 1e-3
    p_last: float = 0.5
    p: float = 0.2
    last_step: int = 0

    @property
    def num_variants(self) -> int:
        """How many graph variants this schedule can produce for one input shape (the full graph included)."""
        return self.blocks if self.schedule == "progressive" else 2 ** self.blocks

    def keep_probabilities(self, step: int) -> list[float]:
        """Probability that each block runs at (1-based) training ``step``, in block order.

        pld: ``θ(t) = (1 − θ̄)e^{−γt} + θ̄`` with ``t = step − 1``; stochastic-depth: ``p_l = 1 − (l/L)(1 − p_L)``;
        uniform: ``1 − p``; progressive runs every block (it freezes, not drops).
        """
        count = self.blocks
        if self.schedule == "pld":
            theta = (1 - self.theta) * math.exp(-self.gamma * (step - 1)) + self.theta
            return [theta] * count
        if self.schedule == "stochastic-depth":
            return [1 - (depth / count) * (1 - self.p_last) for depth in range(1, count + 1)]
        if self.schedule == "uniform":
            return [1 - self.p] * count
        return [1.0] * count

    def variant(self, step: int) -> Hashable | None:
        """progressive: the cutoff ``s`` (None for s = 0); else the frozenset of dropped block indices (None: none)."""
        rng = random.Random(f"graphopt.layerdrop/{self.seed}/{step}")
        self.last_step = step
        if self.schedule == "progressive":
            return rng.randrange(self.blocks) or None
        dropped = frozenset(i for i, keep in enumerate(self.keep_probabilities(step)) if rng.random() >= keep)
        return dropped or None

    def state_dict(self) -> dict[str, Any]:
        """The schedule's RNG state: the seed (draws are a function of seed and step) and the last step drawn."""
        return {"seed": self.seed, "last_step": self.last_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.last_step = int(state.get("last_step", 0))


class LayerDrop(graphopt.Method):
    """Layer-dropping schedules: ``progressive`` (Drop-Muon), ``pld``, ``stochastic-depth``, ``uniform``.

    See the module docstring for the formulas and papers. ``blocks``: None (found in the graph) or module
    globs. ``seed``: the schedule's seed. ``theta``/``gamma``: pld's θ̄ and γ; ``p_last``: stochastic depth's
    survival of the last block; ``p``: LayerDrop's drop probability. Options of other schedules are ignored.
    Adds ``m.layerdrop_blocks()``.
    """

    name = "layerdrop"
    stage = "training"

    def __init__(self, schedule: str = "progressive", blocks: str | list[str] | None = None, seed: int = 0,
                 theta: float = 0.5, gamma: float = 1e-3, p_last: float = 0.5, p: float = 0.2) -> None:
        self.schedule, self.blocks, self.seed = schedule, blocks, seed
        self.theta, self.gamma, self.p_last, self.p = theta, gamma, p_last, p
        self.check(schedule in SCHEDULES, "schedule", f"use one of {', '.join(repr(s) for s in SCHEDULES)}")
        self.check(blocks is None or (isinstance(blocks, str) and bool(blocks))
                   or (isinstance(blocks, list) and bool(blocks) and all(isinstance(b, str) and b for b in blocks)),
                   "blocks", "use None (residual blocks found in the graph), a module glob like 'layers.*', "
                   "or a list of globs")
        self.check(0 < theta <= 1, "theta", "use 0 < theta <= 1 (the long-run keep probability θ̄)")
        self.check(gamma >= 0 and math.isfinite(gamma), "gamma", "use gamma >= 0")
        self.check(0 < p_last <= 1, "p_last", "use 0 < p_last <= 1 (survival probability of the last block)")
        self.check(0 <= p < 1, "p", "use 0 <= p < 1 (drop probability of each block)")

    def apply(self, gm: torch.fx.GraphModule, ctx: graphopt.MethodContext) -> None:
        """Find the blocks in the final forward graph; record the schedule as step variants (and, for
        stochastic depth, the inference scaling)."""
        found = find_blocks(gm, self.blocks, self.name)
        paths = [block.path for block in found]
        schedule = LayerSchedule(self.schedule, len(found), self.seed, self.theta, self.gamma, self.p_last, self.p)
        ctx.add_step_variants(schedule.variant, functools.partial(variant_graph, paths, self.schedule, self.name))
        if self.schedule == "stochastic-depth":
            ctx.add_inference_pass(functools.partial(_scale_by_survival, paths, schedule.keep_probabilities(1),
                                                     self.name))
        ctx.add_state(schedule.state_dict, schedule.load_state_dict)
        ctx.add_model_function("layerdrop_blocks", lambda: list(found))
        lines = [f"layerdrop schedule={self.schedule!r}: {len(found)} blocks, at most {schedule.num_variants} "
                 "graph variants", *(f"  {block}" for block in found)]
        ctx.add_description("\n".join(lines))


def variant_graph(paths: Sequence[str], schedule: str, method: str, gm: torch.fx.GraphModule,
                  variant: Hashable) -> tuple[torch.fx.GraphModule, set[str]]:
    """The forward graph of ``variant`` (a copy of ``gm``) and the parameters that get no update in it:
    progressive detaches the input of block ``variant`` (the blocks below it do not train); the dropping
    schedules remove the blocks in ``variant``."""
    blocks: list[Block] = resolve_blocks(gm, paths, method)
    special = copy_graph_module(gm)
    skipped: set[str] = set()
    if schedule == "progressive":
        cutoff = int(variant)
        detach_input(special, blocks[cutoff])
        for block in blocks[:cutoff]:
            skipped.update(block.parameters)
    else:
        drop_blocks(special, [blocks[i] for i in variant])
    trained = trained_parameters(special)
    skipped |= {n for n, p in special.named_parameters() if p.requires_grad and n not in trained}
    return special, skipped


def _scale_by_survival(paths: Sequence[str], survival: Sequence[float], method: str, gm: torch.fx.GraphModule) -> None:
    """Stochastic depth at inference: each block's residual branches scaled by its survival ``p_l``."""
    for block, p in zip(resolve_blocks(gm, paths, method), survival):
        scale_branches(gm, block, p)


@graphopt.hookimpl
def graphopt_register_methods(register):
    register(LayerDrop)
