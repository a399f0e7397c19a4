"""``adamuon``: AdaMuon (element-wise adaptive Muon) fused into the training graph.

Si, Zhang and Shen 2025, "AdaMuon: Adaptive Muon Optimizer" (arXiv:2507.11005), Algorithm 1. For each
weight ``W`` viewed as an ``m × n`` matrix (conv weights flattened as Muon does), with gradient G, lr η,
momentum β, weight decay λ::

    M ← β·M + G
    N = M            (or G + β·M with nesterov=True)
    O = NS(sign(N))                       sign-stabilised: Muon's quintic on the sign of the momentum
    V ← β·V + (1 − β)·O ⊙ O               element-wise second moment of the orthogonal direction
    Ô = O / (√V + ε)
    γ = 0.2·√(mn) / ‖Ô‖_F                 RMS-aligned: the update's RMS is 0.2·η, as Adam's
    W ← W − η·(γ·Ô + λ·W)

Choices where the paper leaves a detail open: Algorithm 1 has plain momentum; the authors' code uses
Nesterov momentum, offered as ``nesterov=True`` (default False, as the paper). No bias correction (γ
cancels it). The RMS alignment makes η an Adam-scale lr (default 1e-3, the AdamW part's too:
``adamw_lr=1e-3``). Every other parameter takes AdamW(betas=(0.9, 0.95), eps=1e-8, wd=0) as in ``muon``.
State per matrix: ``momentum_buffer`` and ``second_moment``, each of its size.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

import graphopt
from graphopt.optim.functional import newton_schulz, scale_to_rms
from graphopt.optim.matrix import MatrixOptimizer, decay_and_step, matrix_view


class AdaMuon(MatrixOptimizer):
    """AdaMuon for matrices (conv weights flattened), AdamW(betas=(0.9, 0.95), wd=0) for the other parameters."""

    name = "adamuon"

    def __init__(self, lr: float = 1e-3, momentum: float = 0.95, nesterov: bool = False, ns_steps: int = 5,
                 eps: float = 1e-8, weight_decay: float = 0.0, adamw_lr: float = 1e-3) -> None:
        self.lr, self.momentum, self.nesterov, self.ns_steps = lr, momentum, nesterov, ns_steps
        self.eps, self.weight_decay, self.adamw_lr = eps, weight_decay, adamw_lr
        self.check_common(lr, weight_decay, adamw_lr)
        self.check(0 <= momentum < 1, "momentum", "use 0 <= momentum < 1")
        self.check(ns_steps >= 1, "ns_steps", "use ns_steps >= 1 (5 is the paper's choice)")
        self.check(eps > 0, "eps", "use eps > 0")

    def matrix_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"momentum_buffer": torch.zeros_like(param), "second_moment": torch.zeros_like(param)}

    def matrix_update(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
                      hyper: Mapping[str, torch.Tensor]) -> None:
        buffer, second = state["momentum_buffer"], state["second_moment"]
        buffer.mul_(self.momentum).add_(grad)
        direction = grad + self.momentum * buffer if self.nesterov else buffer
        ortho = newton_schulz(matrix_view(direction).sign(), self.ns_steps)
        second = second.view(ortho.shape)  # the state itself, as a matrix
        second.mul_(self.momentum).addcmul_(ortho, ortho, value=1 - self.momentum)
        ortho = ortho / second.sqrt().add_(self.eps)
        decay_and_step(param, scale_to_rms(ortho, 0.2), hyper["lr"], self.weight_decay)


@graphopt.hookimpl
def graphopt_register_methods(register):
    register(AdaMuon)
