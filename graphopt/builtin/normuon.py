"""``normuon``: NorMuon (neuron-wise normalised Muon) fused into the training graph.

Li, Liu, Liang, Chen and Zhao 2025, "NorMuon: Making Muon more efficient and scalable" (arXiv:2510.05491),
Algorithm 1. For each weight ``W`` viewed as an ``m × n`` matrix (rows = output neurons; conv weights
flattened as Muon does), with gradient G, lr η, weight decay λ::

    M ← β1·M + (1 − β1)·G
    O = NS(M)                                  Muon's quintic Newton–Schulz, ns_steps iterations
    v ← β2·v + (1 − β2)·mean_cols(O ⊙ O)       v ∈ R^m, one second moment per neuron
    Ô = O / (√v + ε)                           √v broadcast over each row
    η̂ = 0.2·η·√(mn) / ‖Ô‖_F                    the update's RMS is 0.2·η, as Adam's
    W ← W − ηλ·W − η̂·Ô

Choices where the paper leaves a detail open: no Nesterov momentum and no bias correction (Algorithm 1
has neither); ε defaults to 1e-8. The RMS matching makes η an Adam-scale learning rate (default 1e-3, not
Muon's 0.02), so the AdamW part of non-matrix parameters defaults to the same lr (``adamw_lr=1e-3``).
Every other parameter takes AdamW(betas=(0.9, 0.95), eps=1e-8, wd=0) as in ``muon``
(``graphopt.optim.matrix``). State per matrix: ``momentum_buffer`` (its size) and ``second_moment`` (m).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

import graphopt
from graphopt.optim.functional import newton_schulz, scale_to_rms
from graphopt.optim.matrix import MatrixOptimizer, decay_and_step, matrix_view


class NorMuon(MatrixOptimizer):
    """NorMuon for matrices (conv weights flattened), AdamW(betas=(0.9, 0.95), wd=0) for the other parameters."""

    name = "normuon"

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.95, 0.95), eps: float = 1e-8,
                 ns_steps: int = 5, weight_decay: float = 0.0, adamw_lr: float = 1e-3) -> None:
        self.lr, self.betas, self.eps, self.ns_steps = lr, tuple(betas), eps, ns_steps
        self.weight_decay, self.adamw_lr = weight_decay, adamw_lr
        self.check_common(lr, weight_decay, adamw_lr)
        self.check(all(0 <= b < 1 for b in self.betas), "betas", "use two numbers in [0, 1), e.g. (0.95, 0.95)")
        self.check(eps > 0, "eps", "use eps > 0")
        self.check(ns_steps >= 1, "ns_steps", "use ns_steps >= 1 (5 is the paper's choice)")

    def matrix_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"momentum_buffer": torch.zeros_like(param), "second_moment": param.new_zeros(param.shape[0])}

    def matrix_update(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
                      hyper: Mapping[str, torch.Tensor]) -> None:
        beta1, beta2 = self.betas
        momentum, second = state["momentum_buffer"], state["second_moment"]
        momentum.lerp_(grad, 1 - beta1)
        ortho = newton_schulz(matrix_view(momentum), self.ns_steps)
        second.lerp_(ortho.square().mean(dim=1), 1 - beta2)
        ortho.div_(second.sqrt().add_(self.eps)[:, None])
        decay_and_step(param, scale_to_rms(ortho, 0.2), hyper["lr"], self.weight_decay)


@graphopt.hookimpl
def graphopt_register_methods(register):
    register(NorMuon)
