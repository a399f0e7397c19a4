"""``adamw``: AdamW fused into the training graph, equal to ``torch.optim.AdamW`` (same options).

Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization". Per parameter, with its own step
count t (1-based), lr η, weight decay λ::

    p ← p·(1 − ηλ)
    m ← β1·m + (1 − β1)·g            v ← β2·v + (1 − β2)·g²
    p ← p − (η / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + ε)

The update runs inside the captured training step, right after the parameter's gradient exists
(see ``graphopt.train.schedule``). State per parameter: ``step`` (0-d float64), ``exp_avg``, ``exp_avg_sq``.
Shared options ``groups`` and ``max_grad_norm`` come from ``graphopt.optim.Optimizer``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

import graphopt
from graphopt.optim.functional import adam_state, adam_step


class AdamW(graphopt.optim.Optimizer):
    """AdamW (decoupled weight decay), torch.optim.AdamW semantics (amsgrad off, maximize off)."""

    name = "adamw"
    elementwise = True  # sharded training updates each rank's rows as they are

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2) -> None:
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.check(lr >= 0, "lr", "use lr >= 0")
        self.check(all(0 <= b < 1 for b in self.betas), "betas", "use two numbers in [0, 1), e.g. (0.9, 0.999)")
        self.check(eps > 0, "eps", "use eps > 0")
        self.check(weight_decay >= 0, "weight_decay", "use weight_decay >= 0")

    def init_state(self, name: str, param: torch.Tensor) -> dict[str, torch.Tensor]:
        return adam_state(param)

    def update(self, name: str, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
               hyper: Mapping[str, torch.Tensor]) -> None:
        adam_step(param, grad, state, hyper["lr"], self.betas, self.eps, self.weight_decay)


@graphopt.hookimpl
def graphopt_register_methods(register):
    register(AdamW)

