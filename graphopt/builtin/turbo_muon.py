"""``turbo_muon``: Turbo-Muon (Muon with an AOL-preconditioned Newton–Schulz) fused into the training graph.

Boissin, Massena, Mamalet and Serrurier 2025, "Turbo-Muon: Accelerating Orthogonality-Based Optimization
with Pre-Conditioning" (arXiv:2512.04632). Muon's outer loop (``muon``: momentum, Nesterov, shape factor,
decoupled weight decay, AdamW for non-matrix parameters) with the orthogonalisation replaced. For the
matrix view N of a weight (conv weights flattened), Nᵀ when rows > cols::

    B ← μB + G;   N = G + μB (nesterov) | B
    A = N Nᵀ;  s_i = max(Σ_j |A_ij|, 1e-6)^(−1/2)      AOL rescaling (Prach & Lampert 2022): ‖diag(s) N‖₂ ≤ 1
    X ← diag(s) N;  A ← diag(s) A diag(s)              the first iteration reuses this Gram matrix
    for (a_k, b_k, c_k) in the last K of the 5-step schedule (K = ns_steps = 4):
        X ← a_k X + (b_k A + c_k A²) X;   A = X Xᵀ
    W ← W·(1 − ηλ) − η·max(1, rows/cols)^0.5·X

The preconditioned start is closer to orthogonal than N/‖N‖_F, so one iteration is dropped (4 instead of
5). The coefficients are the authors' reference implementation's: its 5-step schedule
(``graphopt.optim.functional.TURBO_SCHEDULE``) without the first entry, the AOL floor 1e-6 as there.
``ns_steps`` may be 1 to 5 (the last ``ns_steps`` entries are used). State per matrix: ``momentum_buffer``.
"""

from __future__ import annotations

import torch

import graphopt
from graphopt.builtin.muon import Muon
from graphopt.optim.functional import TURBO_SCHEDULE, newton_schulz


class TurboMuon(Muon):
    """Turbo-Muon: Muon with AOL preconditioning and 4 Newton–Schulz iterations; AdamW for the other parameters."""

    name = "turbo_muon"

    def __init__(self, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 4,
                 weight_decay: float = 0.0, adamw_lr: float = 3e-4) -> None:
        self.ns_steps = ns_steps
        self.check(1 <= ns_steps <= len(TURBO_SCHEDULE), "ns_steps",
                   f"use 1 <= ns_steps <= {len(TURBO_SCHEDULE)} (4 is the paper's choice)")
        super().__init__(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                         weight_decay=weight_decay, adamw_lr=adamw_lr)

    def orthogonalised(self, direction: torch.Tensor) -> torch.Tensor:
        """``scale · NS_AOL(direction)`` with the matrix view ``(rows, rest)``, ``scale = max(1, rows/cols)^0.5``."""
        rows = direction.shape[0]
        matrix = direction.reshape(rows, -1)
        scale = max(1.0, rows / matrix.shape[1]) ** 0.5
        ortho = newton_schulz(matrix, self.ns_steps, TURBO_SCHEDULE[-self.ns_steps:], aol=True)
        return ortho.mul_(scale).view_as(direction)


@graphopt.hookimpl
def graphopt_register_methods(register):
    register(TurboMuon)
