"""The shared frame of the Muon family: a matrix rule for weights, AdamW for the rest.

Every parameter with two or more dimensions is a matrix: a conv weight ``(out, in, kh, kw)`` is viewed as
``(out, in·kh·kw)``, as Muon does (Jordan et al. 2024), so ``rows`` are the output neurons. Every other
parameter (biases, norm scales) takes an AdamW step with betas (0.9, 0.95), eps 1e-8, no weight decay and
lr ``current_lr · adamw_lr / lr`` (so ``m.set_lr`` and schedules scale both alike), as ``muon`` does.
Subclasses write :meth:`MatrixOptimizer.matrix_state` and :meth:`MatrixOptimizer.matrix_update`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from graphopt.optim import Optimizer
from graphopt.optim.functional import adam_state, adam_step

if TYPE_CHECKING:
    from graphopt.distributed import Shard

ADAMW_BETAS = (0.9, 0.95)
ADAMW_EPS = 1e-8


def is_matrix(param: torch.Tensor) -> bool:
    """The Muon family handles every parameter with 2 or more dimensions; the rest take AdamW."""
    return param.dim() >= 2


def matrix_view(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as the ``(rows, rest)`` matrix the rules work on (a view of the same storage)."""
    return tensor.reshape(tensor.shape[0], -1)


def decay_and_step(param: torch.Tensor, step: torch.Tensor, lr: torch.Tensor, weight_decay: float) -> None:
    """``W ← W·(1 − ηλ) − η·step`` in place (decoupled weight decay, as AdamW); ``step`` is consumed."""
    lr = lr.to(param.dtype)
    if weight_decay:
        param.mul_(1 - lr * weight_decay)
    param.sub_(step.view_as(param).mul_(lr))


class MatrixOptimizer(Optimizer):
    """Base of the Muon family: :meth:`matrix_update` for matrices, AdamW (lr ``adamw_lr``) for the rest."""

    adamw_lr: float

    def check_common(self, lr: float, weight_decay: float, adamw_lr: float) -> None:
        """The range checks every member shares."""
        self.check(lr > 0, "lr", "use lr > 0 (the AdamW lr of non-matrix parameters is relative to it)")
        self.check(weight_decay >= 0, "weight_decay", "use weight_decay >= 0")
        self.check(adamw_lr >= 0, "adamw_lr", "use adamw_lr >= 0")

    def matrix_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state tensors of a matrix parameter (``param`` has its own shape, not the matrix view)."""
        raise NotImplementedError(f"optimizer {self.name!r} does not implement matrix_state()")

    def matrix_update(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
                      hyper: Mapping[str, torch.Tensor]) -> None:
        """Update a matrix parameter (and its state) in place from its gradient."""
        raise NotImplementedError(f"optimizer {self.name!r} does not implement matrix_update()")

    def init_state(self, name: str, param: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.matrix_state(param) if is_matrix(param) else adam_state(param)

    def update_shard(self, name: str, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
                     hyper: Mapping[str, torch.Tensor], shard: Shard) -> None:
        """Sharded: AdamW on this rank's entries; a matrix gathered whole (``Optimizer.update_shard``)."""
        if is_matrix(param):
            super().update_shard(name, param, grad, state, hyper, shard)
        else:
            self.update(name, param, grad, state, hyper)

    def update(self, name: str, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
               hyper: Mapping[str, torch.Tensor]) -> None:
        if is_matrix(param):
            self.matrix_update(param, grad, state, hyper)
        else:
            adam_step(param, grad, state, hyper["lr"] * (self.adamw_lr / self.lr), ADAMW_BETAS, ADAMW_EPS, 0.0)
