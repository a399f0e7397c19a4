"""``root``: ROOT (robust orthogonalised optimizer) fused into the training graph.

He, Han, Zhou, Chen, Liu, Chen and Wang 2025, "ROOT: Robust Orthogonalized Optimizer for Neural Network
Training" (arXiv:2511.20626), Algorithm 1. For each weight ``W`` viewed as an ``m × n`` matrix (conv weights
flattened as Muon does), with gradient G, lr η, momentum μ, weight decay λ::

    B ← μ·B + G;   M = G + μ·B (nesterov) | B
    ε = quantile_q(|M|) + 1e-9                        the threshold, q = threshold_quantile
    O = sign(M)·max(|M| − ε, 0)                       outliers: the soft-thresholding T_ε[M]
    R = M − O                                         the robust part (M clipped to [−ε, ε])
    X = NS(R) with (a, b, c) = ROOT's coefficients for the shape (min(m, n), max(m, n))
    W ← W·(1 − ηλ) − η·0.2·√max(m, n)·X

Dimension robustness: the authors publish quintic coefficients fitted per matrix shape
(``graphopt.optim.functional.ROOT_COEFFICIENTS``: 2048 × {2048, 3072, 8192, 16384}); for any other shape
their code, and this module, use Muon's (3.4445, −4.7750, 2.0315). Choices where the paper leaves a
detail open, all as in the authors' code: Nesterov momentum; the threshold is the 0.9-quantile of |M| each
step; the update is scaled by 0.2·√max(m, n) so that its RMS matches Adam's (Moonlight's rule), which makes
η an Adam-scale lr (default 1e-3, the AdamW part's too). The weight decay is decoupled and, as in ``muon``,
applies to the matrices only (default 0). Every other parameter takes AdamW(betas=(0.9, 0.95), eps=1e-8,
wd=0) with ``adamw_lr``. State per matrix: ``momentum_buffer`` (its size).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

import graphopt
from graphopt.optim.functional import newton_schulz, root_coefficients
from graphopt.optim.matrix import MatrixOptimizer, decay_and_step, matrix_view


def soft_threshold_split(m: torch.Tensor, quantile: float) -> torch.Tensor:
    """The robust part ``M − T_ε[M]`` with ``ε = quantile(|M|) + 1e-9`` (the outliers are dropped)."""
    magnitude = m.abs()
    threshold = torch.quantile(magnitude.flatten(), quantile) + 1e-9
    outliers = m.sign() * torch.relu(magnitude - threshold)
    return m - outliers


class ROOT(MatrixOptimizer):
    """ROOT for matrices (conv weights flattened), AdamW(betas=(0.9, 0.95), wd=0) for the other parameters."""

    name = "root"

    def __init__(self, lr: float = 1e-3, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 threshold_quantile: float = 0.9, weight_decay: float = 0.0, adamw_lr: float = 1e-3) -> None:
        self.lr, self.momentum, self.nesterov, self.ns_steps = lr, momentum, nesterov, ns_steps
        self.threshold_quantile, self.weight_decay, self.adamw_lr = threshold_quantile, weight_decay, adamw_lr
        self.check_common(lr, weight_decay, adamw_lr)
        self.check(0 <= momentum < 1, "momentum", "use 0 <= momentum < 1")
        self.check(ns_steps >= 1, "ns_steps", "use ns_steps >= 1 (5 is the paper's choice)")
        self.check(0 < threshold_quantile <= 1, "threshold_quantile",
                   "use 0 < threshold_quantile <= 1 (0.9 as the authors; 1 keeps every entry)")

    def matrix_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"momentum_buffer": torch.zeros_like(param)}

    def matrix_update(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
                      hyper: Mapping[str, torch.Tensor]) -> None:
        buffer = state["momentum_buffer"]
        buffer.mul_(self.momentum).add_(grad)
        direction = matrix_view(grad + self.momentum * buffer if self.nesterov else buffer)
        robust = soft_threshold_split(direction, self.threshold_quantile)
        rows, cols = robust.shape
        ortho = newton_schulz(robust, self.ns_steps, root_coefficients(rows, cols))
        decay_and_step(param, ortho.mul_(0.2 * max(rows, cols) ** 0.5), hyper["lr"], self.weight_decay)


@graphopt.hookimpl
def graphopt_register_methods(register):
    register(ROOT)
