"""``auon``: AuON (unit-norm momentum updates by normalised non-linear scaling) and Hybrid-AuON.

Maity 2025, "AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates" (arXiv:2509.24320),
section 3. For each weight ``W`` viewed as a matrix (conv weights flattened as Muon does) with N = m·n
entries, gradient G, lr η, momentum μ, weight decay λ::

    B ← μ·B + (1 − μ)·G
    D = μ·B + (1 − μ)·G    (nesterov)   or   D = B
    X = D / (‖D‖_F + 1e-7)                       AuON: linear time, no matrix product
    X = NS₁(D)                                   hybrid=True: one Newton–Schulz step (Muon's quintic on D/‖D‖_F)
    r = √(mean(cosh(X)²))                        a tail-sensitive global scale: spiky updates shrink more
    W ← W·(1 − ηλ) − η·X / (r + 1e-8)

Choices where the paper leaves a detail open: Nesterov momentum on by default (the authors' code uses
it); the hybrid's r is the same root-mean-square of cosh as AuON's (section 3.2 prints it without the
square root) and its input is normalised as Muon's Newton–Schulz does (‖D‖_F, no 1e-7); no Muon shape
factor (the paper's update is ``η·X/(r + 1e-8)``). lr 0.055 is the paper's language-model value. Every
other parameter takes AdamW(betas=(0.9, 0.95), eps=1e-8, wd=0) with ``adamw_lr``, as in ``muon``.
State per matrix: ``momentum_buffer`` (its size).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

import graphopt
from graphopt.optim.functional import newton_schulz
from graphopt.optim.matrix import MatrixOptimizer, decay_and_step, matrix_view


def cosh_rms_scaled(x: torch.Tensor) -> torch.Tensor:
    """``x / (√(mean(cosh(x)²)) + 1e-8)``: AuON's normalised non-linear scaling (a new tensor)."""
    return x / (torch.cosh(x).square().mean().sqrt() + 1e-8)


class AuON(MatrixOptimizer):
    """AuON (or Hybrid-AuON with ``hybrid=True``) for matrices, AdamW(betas=(0.9, 0.95), wd=0) for the rest."""

    name = "auon"

    def __init__(self, lr: float = 0.055, momentum: float = 0.95, nesterov: bool = True, hybrid: bool = False,
                 weight_decay: float = 0.0, adamw_lr: float = 3e-4) -> None:
        self.lr, self.momentum, self.nesterov, self.hybrid = lr, momentum, nesterov, hybrid
        self.weight_decay, self.adamw_lr = weight_decay, adamw_lr
        self.check_common(lr, weight_decay, adamw_lr)
        self.check(0 <= momentum < 1, "momentum", "use 0 <= momentum < 1")

    def matrix_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"momentum_buffer": torch.zeros_like(param)}

    def matrix_update(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
                      hyper: Mapping[str, torch.Tensor]) -> None:
        buffer = state["momentum_buffer"]
        buffer.lerp_(grad, 1 - self.momentum)
        direction = matrix_view(grad.lerp(buffer, self.momentum) if self.nesterov else buffer)
        if self.hybrid:
            x = newton_schulz(direction, 1)
        else:
            x = direction / (torch.linalg.matrix_norm(direction) + 1e-7)
        decay_and_step(param, cosh_rms_scaled(x), hyper["lr"], self.weight_decay)


@graphopt.hookimpl
def graphopt_register_methods(register):
    register(AuON)
