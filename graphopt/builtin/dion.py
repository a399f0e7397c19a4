"""``dion``: Dion, the orthonormalized update built for sharded weights, fused into the training graph.

Ahn, Xu, Abreu, Fan, Magakyan, Sharma, Zhan and Langford 2025, "Dion: Distributed Orthonormalized Updates"
(arXiv:2504.05295). For each weight with two or more dimensions, as the ``m × n`` matrix ``(rows, rest)``
(a conv weight flattened, as Muon does), with gradient G, momentum buffer M (zero at first), right factor
Q (``n × r``), lr η, momentum decay μ, weight decay λ, one step of power iteration with error feedback::

    B = M + G
    P = orthonormal(B Q)                 (QR: the m × r factor with orthonormal columns)
    R = Bᵀ P                             (n × r)
    M ← B − (1 − μ)·P Rᵀ                 (error feedback: what the rank-r step left behind stays)
    Q ← R / (‖R_:j‖ + ε)                 (column-normalised, the next step's start; ε = 1e-8)
    W ← W·(1 − ηλ) − η·√(m/n)·P Qᵀ

``r = min(rank, m, n)`` (``rank=None``: full rank ``min(m, n)``). ``Q₀`` is drawn from a standard normal with
a generator seeded by ``zlib.crc32(name)``, so every rank (and a rerun) starts from the same factor. Every
other parameter (biases, norm weights) takes an AdamW step with lr ``adamw_lr``, betas (0.9, 0.95), eps
1e-8, no weight decay, as in the Muon family (``graphopt.optim.matrix``).

Sharded (``sharding="grad_op"``/``"full"``), each rank holds rows of W, G and M (``Optimizer.row_slots``:
``momentum``; Q is ``n × r`` and whole on every rank) and never builds the full matrix: its rows of P are
``B_r Q``; the ``m × r`` factor P is all-gathered and orthonormalised on every rank (the paper orthonormalises
it distributedly; gathering the small factor moves the same order of data and gives one process's QR), each
rank keeps its rows ``P_r``; ``R = Σ_r B_rᵀ P_r`` is one all-reduce of ``n × r``; error feedback and the
update touch only the rank's rows. Communication per matrix: ``(m + n)·r`` numbers instead of Muon's ``m·n``.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import replace

import torch

import graphopt
import graphopt.distributed
from graphopt.optim.matrix import MatrixOptimizer, decay_and_step, is_matrix, matrix_view

COLUMN_EPS = 1e-8


def initial_factor(name: str, cols: int, rank: int, like: torch.Tensor) -> torch.Tensor:
    """``Q₀ ~ N(0, 1)^{cols × rank}`` from a CPU generator seeded by ``zlib.crc32(name)``, in ``like``'s dtype."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(cols, rank, generator=generator, dtype=like.dtype).to(like.device)


class Dion(MatrixOptimizer):
    """Dion (low-rank power iteration with error feedback) for matrices, AdamW for the other parameters."""

    name = "dion"

    def __init__(self, lr: float = 0.02, momentum: float = 0.95, rank: int | None = None, weight_decay: float = 0.0,
                 adamw_lr: float = 3e-4) -> None:
        self.lr, self.momentum, self.rank, self.weight_decay, self.adamw_lr = lr, momentum, rank, weight_decay, adamw_lr
        self.check_common(lr, weight_decay, adamw_lr)
        self.check(0 <= momentum < 1, "momentum", "use 0 <= momentum < 1 (the paper's μ, 0.95)")
        self.check(rank is None or (isinstance(rank, int) and rank >= 1), "rank",
                   "use an integer rank >= 1, or None for full rank min(rows, cols)")

    def _rank(self, rows: int, cols: int) -> int:
        return min(rows, cols) if self.rank is None else min(self.rank, rows, cols)

    def init_state(self, name: str, param: torch.Tensor) -> dict[str, torch.Tensor]:
        if not is_matrix(param):
            return super().init_state(name, param)
        rows, cols = matrix_view(param).shape
        return {"momentum": torch.zeros_like(param), "q": initial_factor(name, cols, self._rank(rows, cols), param)}

    def row_slots(self, name: str, shape: tuple[int, ...], state: Mapping[str, torch.Tensor]) -> set[str]:
        return {"momentum"} if len(shape) >= 2 else super().row_slots(name, shape, state)

    def matrix_update(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
                      hyper: Mapping[str, torch.Tensor]) -> None:
        momentum, q = matrix_view(state["momentum"]), state["q"]
        buffer = momentum.add_(matrix_view(grad))  # B = M + G, in M's storage
        p = torch.linalg.qr(buffer @ q).Q
        r = buffer.t() @ p
        self._finish(param, buffer, p, r, q, hyper, rows=buffer.shape[0])

    def update_shard(self, name: str, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
                     hyper: Mapping[str, torch.Tensor], shard: graphopt.distributed.Shard) -> None:
        """This rank's rows of W, G and M; P gathered (``m × r``), R all-reduced (``n × r``)."""
        if not is_matrix(param):
            self.update(name, param, grad, state, hyper)
            return
        momentum, q = matrix_view(state["momentum"]), state["q"]
        buffer = momentum.add_(matrix_view(grad))  # this rank's rows of B
        factor = replace(shard, shape=(shard.rows, q.shape[1]))  # P's rows lie like the parameter's
        p = factor.local(torch.linalg.qr(factor.gather(buffer @ q)).Q)
        r = shard.all_reduce(buffer.t() @ p)
        self._finish(param, buffer, p, r, q, hyper, rows=shard.rows)

    def _finish(self, param: torch.Tensor, buffer: torch.Tensor, p: torch.Tensor, r: torch.Tensor, q: torch.Tensor,
                hyper: Mapping[str, torch.Tensor], rows: int) -> None:
        """Error feedback, the next factor and the step (on all rows, or on this rank's)."""
        buffer.addmm_(p, r.t(), alpha=-(1 - self.momentum))  # M ← B − (1 − μ) P Rᵀ
        q.copy_(r / (torch.linalg.vector_norm(r, dim=0, keepdim=True) + COLUMN_EPS))
        scale = (rows / buffer.shape[1]) ** 0.5
        decay_and_step(param, (p @ q.t()).mul_(scale), hyper["lr"], self.weight_decay)


@graphopt.hookimpl
def graphopt_register_methods(register):
    register(Dion)
