"""``adago``: AdaGO (AdaGrad-norm stepsizes for orthogonalised momentum) fused into the training graph.

Zhang, Liu and Schaeffer 2025, "AdaGrad Meets Muon: Adaptive Stepsizes for Orthogonal Updates"
(arXiv:2509.02981), Algorithm 1. For each weight ``W`` viewed as a matrix (conv weights flattened as Muon
does), with gradient G, lr η, momentum μ, clamp γ, floor ε, weight decay λ::

    M ← μ·M + (1 − μ)·G
    v² ← v² + min(‖G‖_F², γ²)             one scalar per matrix, v² = v₀² before the first step
    α = max(ε, η·min(‖G‖_F, γ) / v)
    W ← W·(1 − ηλ) − α·NS(M)              Muon's quintic Newton–Schulz, ns_steps iterations

The update keeps the orthogonal direction (unlike element-wise adaptive variants) and adapts only its
length. Choices where the paper leaves a detail open: ‖·‖ is the Frobenius norm of the matrix's gradient;
defaults v₀ = 1, γ = 1, ε = 1e-6, μ = 0.95; no Muon shape factor (the paper's update is ``α·NS(M)``); the
decoupled weight decay (default 0) is graphopt's addition, as in ``muon``. ``lr`` bounds the step (α ≤ η)
and AdaGrad's accumulation shrinks it like 1/√t, so it is larger than Muon's (default 0.1). Every other
parameter takes AdamW(betas=(0.9, 0.95), eps=1e-8, wd=0) with ``adamw_lr``, as in ``muon``. State per
matrix: ``momentum_buffer`` (its size) and ``v_sq`` (a scalar).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

import graphopt
from graphopt.optim.functional import newton_schulz
from graphopt.optim.matrix import MatrixOptimizer, matrix_view


class AdaGO(MatrixOptimizer):
    """AdaGO for matrices (conv weights flattened), AdamW(betas=(0.9, 0.95), wd=0) for the other parameters."""

    name = "adago"

    def __init__(self, lr: float = 0.1, momentum: float = 0.95, gamma: float = 1.0, eps: float = 1e-6,
                 v0: float = 1.0, ns_steps: int = 5, weight_decay: float = 0.0, adamw_lr: float = 3e-4) -> None:
        self.lr, self.momentum, self.gamma, self.eps, self.v0 = lr, momentum, gamma, eps, v0
        self.ns_steps, self.weight_decay, self.adamw_lr = ns_steps, weight_decay, adamw_lr
        self.check_common(lr, weight_decay, adamw_lr)
        self.check(0 <= momentum < 1, "momentum", "use 0 <= momentum < 1")
        self.check(gamma > 0, "gamma", "use gamma > 0 (the clamp of the gradient norm)")
        self.check(eps >= 0, "eps", "use eps >= 0 (the floor of the step size)")
        self.check(v0 > 0, "v0", "use v0 > 0 (the initial accumulator; the step divides by it)")
        self.check(ns_steps >= 1, "ns_steps", "use ns_steps >= 1 (5 as in Muon)")

    def matrix_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"momentum_buffer": torch.zeros_like(param), "v_sq": param.new_full((), self.v0**2)}

    def matrix_update(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
                      hyper: Mapping[str, torch.Tensor]) -> None:
        buffer, v_sq = state["momentum_buffer"], state["v_sq"]
        buffer.lerp_(grad, 1 - self.momentum)
        clamped = torch.linalg.vector_norm(grad).clamp_max(self.gamma)
        v_sq.add_(clamped.square())
        lr = hyper["lr"].to(param.dtype)
        step_size = (lr * clamped / v_sq.sqrt()).clamp_min(self.eps)
        update = newton_schulz(matrix_view(buffer), self.ns_steps).mul_(step_size)
        if self.weight_decay:
            param.mul_(1 - lr * self.weight_decay)
        param.sub_(update.view_as(param))


@graphopt.hookimpl
def graphopt_register_methods(register):
    register(AdaGO)
