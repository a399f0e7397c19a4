"""``muon``: Muon (MomentUm Orthogonalized by Newton–Schulz) fused into the training graph.

Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks" (kellerjordan.github.io/posts/muon).
For each weight with two or more dimensions (a conv weight ``(out, in, kh, kw)`` is flattened to
``(out, in·kh·kw)``), with gradient G, momentum μ, lr η, weight decay λ::

    B ← μB + G
    N = G + μB  (nesterov)   or   N = B
    X ← N / ‖N‖_F;  Xᵀ instead when rows > cols
    5× (ns_steps):  A = X Xᵀ;  X ← aX + (bA + cA²) X,   (a, b, c) = (3.4445, −4.7750, 2.0315)
    N_orth = X (transposed back);  scale = max(1, rows/cols)^0.5
    W ← W·(1 − ηλ) − η·scale·N_orth

Sharded (``sharding="grad_op"``/``"full"``), each rank runs the momentum step on its rows of ``B`` and ``G``,
the rows of ``N`` are all-gathered, every rank orthogonalises the full ``N`` and keeps its rows of the step
(Moonlight's distributed Muon, Liu et al. 2025, "Muon is Scalable for LLM Training"): the state stays sharded
and the numbers are those of one process.

Every other parameter (biases, norm weights) takes an AdamW step with lr ``adamw_lr``, betas (0.9, 0.95),
eps 1e-8, no weight decay (``graphopt.optim.adam_step``). ``m.set_lr`` / a schedule scale both lrs alike:
the AdamW lr is ``current_lr · adamw_lr / lr``. The weight decay is decoupled (as in AdamW); it is 0 by default.

Other optimizers that orthogonalise per-matrix updates build on :func:`graphopt.optim.functional.newton_schulz`
and :class:`Muon` (layer-drop's Drop-Muon, ``turbo_muon``) or :class:`graphopt.optim.matrix.MatrixOptimizer`
(``normuon``, ``adamuon``, ``adago``, ``auon``, ``root``); docs/methods/optimizers.md compares them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

import graphopt
import graphopt.distributed
from graphopt.optim.functional import adam_state, adam_step, newton_schulz
from graphopt.optim.matrix import ADAMW_BETAS, ADAMW_EPS


def uses_muon(param: torch.Tensor) -> bool:
    """Muon handles every parameter with 2 or more dimensions; the rest take AdamW."""
    return param.dim() >= 2


class Muon(graphopt.optim.Optimizer):
    """Muon for matrices (conv weights flattened), AdamW(betas=(0.9, 0.95), wd=0) for the other parameters."""

    name = "muon"

    def __init__(self, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 weight_decay: float = 0.0, adamw_lr: float = 3e-4) -> None:
        self.lr, self.momentum, self.nesterov, self.ns_steps = lr, momentum, nesterov, ns_steps
        self.weight_decay, self.adamw_lr = weight_decay, adamw_lr
        self.check(lr > 0, "lr", "use lr > 0 (the AdamW lr of non-matrix parameters is relative to it)")
        self.check(0 <= momentum < 1, "momentum", "use 0 <= momentum < 1")
        self.check(ns_steps >= 1, "ns_steps", "use ns_steps >= 1 (5 is the paper's choice)")
        self.check(weight_decay >= 0, "weight_decay", "use weight_decay >= 0")
        self.check(adamw_lr >= 0, "adamw_lr", "use adamw_lr >= 0")

    def init_state(self, name: str, param: torch.Tensor) -> dict[str, torch.Tensor]:
        if uses_muon(param):
            return {"momentum_buffer": torch.zeros_like(param)}
        return adam_state(param)

    def direction(self, grad: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """The momentum step: ``B ← μB + G``; returns ``G + μB`` (nesterov) or ``B``."""
        buffer = state["momentum_buffer"]
        buffer.mul_(self.momentum).add_(grad)
        return grad + self.momentum * buffer if self.nesterov else buffer

    def orthogonalised(self, direction: torch.Tensor) -> torch.Tensor:
        """``scale · NS(direction)`` with the matrix view ``(rows, rest)`` and ``scale = max(1, rows/cols)^0.5``."""
        rows = direction.shape[0]
        matrix = direction.reshape(rows, -1)
        cols = matrix.shape[1]
        scale = max(1.0, rows / cols) ** 0.5
        return newton_schulz(matrix, self.ns_steps).mul_(scale).view_as(direction)

    def update(self, name: str, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
               hyper: Mapping[str, torch.Tensor]) -> None:
        if not uses_muon(param):
            adam_step(param, grad, state, hyper["lr"] * (self.adamw_lr / self.lr), ADAMW_BETAS, ADAMW_EPS, 0.0)
            return
        self._apply(param, self.orthogonalised(self.direction(grad, state)), hyper)

    def update_shard(self, name: str, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
                     hyper: Mapping[str, torch.Tensor], shard: graphopt.distributed.Shard) -> None:
        """This rank's rows: the momentum step on them, the full direction gathered and orthogonalised."""
        if not uses_muon(param):  # AdamW acts entry by entry
            self.update(name, param, grad, state, hyper)
            return
        direction = shard.gather(self.direction(grad, state))
        self._apply(param, shard.local(self.orthogonalised(direction)), hyper)

    def _apply(self, param: torch.Tensor, step: torch.Tensor, hyper: Mapping[str, torch.Tensor]) -> None:
        """``W ← W·(1 − ηλ) − η·step`` (``step`` is consumed)."""
        lr = hyper["lr"].to(param.dtype)
        if self.weight_decay:
            param.mul_(1 - lr * self.weight_decay)
        param.sub_(step.mul_(lr))


@graphopt.hookimpl
def graphopt_register_methods(register):
    register(Muon)

