"""``vera``: vector-based random matrix adaptation, a LoRA-style branch added to a layer's output.

VeRA (Kopiczko, Blankevoort and Asano, ICLR 2024, "VeRA: Vector-based Random Matrix Adaptation") keeps
the low-rank factors frozen and random and trains two scaling vectors. For a linear layer ``y = x Wᵀ + b``::

    y = x Wᵀ + b + λ_b ⊙ ((x Aᵀ ⊙ λ_d) Bᵀ),      ΔW = diag(λ_b) B diag(λ_d) A

with ``A ∈ R^{r×in}`` and ``B ∈ R^{out×r}`` frozen (Kaiming-uniform from ``seed``), ``λ_d ∈ R^r`` trained
from ``d_init`` and ``λ_b ∈ R^out`` trained from zeros, so the model starts unchanged. (The paper shares one
pair of random matrices across layers of equal shape; this example draws one pair per layer.) Export with
``merge=True`` folds ``W ← W + ΔW``.
"""

from __future__ import annotations

import math

import torch

import graphopt
from graphopt.rewrite.adapters import fold_output_deltas, insert_output_delta


def vera_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, d: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``λ_b ⊙ ((x Aᵀ ⊙ λ_d) Bᵀ)``."""
    return ((x @ A.t()) * d) @ B.t() * b


def vera_fold_delta(A: torch.Tensor, B: torch.Tensor, d: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``ΔW = diag(λ_b) B diag(λ_d) A`` in ``(out, in)`` layout."""
    return (b[:, None] * (B * d)) @ A


class VeRA(graphopt.Method):
    """VeRA (Kopiczko et al. 2024): frozen random ``A``, ``B``; trained vectors ``λ_d`` (rank) and ``λ_b`` (output)."""

    name = "vera"
    stage = "forward"

    def __init__(self, r: int = 16, d_init: float = 0.1, targets: str | list[str] | None = None,
                 seed: int = 0) -> None:
        self.r, self.d_init, self.targets, self.seed = r, d_init, targets, seed
        self.check(r >= 1, "r", "use r >= 1")
        self.check(math.isfinite(d_init), "d_init", "use a finite d_init (the paper uses 0.1)")

    def apply(self, gm: torch.fx.GraphModule, ctx: graphopt.MethodContext) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        for layer in ctx.select(self.targets):
            a = torch.empty(self.r, layer.in_features).uniform_(-layer.in_features**-0.5, layer.in_features**-0.5,
                                                                generator=generator)
            b = torch.empty(layer.out_features, self.r).uniform_(-self.r**-0.5, self.r**-0.5, generator=generator)
            names = [
                ctx.add_parameter(layer.path, "A", a, trainable=False),
                ctx.add_parameter(layer.path, "B", b, trainable=False),
                ctx.add_parameter(layer.path, "d", torch.full((self.r,), float(self.d_init))),
                ctx.add_parameter(layer.path, "b", torch.zeros(layer.out_features)),
            ]
            insert_output_delta(ctx, layer, vera_delta, names)
        ctx.add_export_pass(lambda export_gm: fold_output_deltas(export_gm, vera_delta, vera_fold_delta), merge=True)
