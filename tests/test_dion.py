"""``dion`` against Dion written from the paper in plain PyTorch (Ahn et al. 2025, "Dion: Distributed
Orthonormalized Updates", Algorithm 1 with the √(m/n) scale and decoupled weight decay of its experiments).

The reference steps an eager copy of the model with ``torch.autograd``: for each matrix (a conv weight as
``(out, in·kh·kw)``), ``B = M + G``, ``P = QR(B Q).Q``, ``R = Bᵀ P``, ``M ← B − (1 − μ) P Rᵀ``,
``Q ← R / (‖R_:j‖ + 1e-8)``, ``W ← W (1 − ηλ) − η √(m/n) P Qᵀ``, with ``Q₀`` the documented seeded normal draw;
``torch.optim.AdamW`` (betas (0.9, 0.95), eps 1e-8, no weight decay, lr ``adamw_lr``) for the biases. A
mean-squared-error loss keeps every gradient full-rank (with cross-entropy the head's gradient rows sum to zero,
and at full rank the power iteration's extra direction is rounding noise, different in any two programs).
The sharded update is checked against the single-process one in ``test_distributed.py``.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import graphopt

STEPS = 5


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(4 * 3 * 3, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(torch.tanh(self.conv(x)).flatten(1))))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet().double()


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 2, 5, 5, generator=g, dtype=torch.float64),
             torch.randn(16, 5, generator=g, dtype=torch.float64)) for _ in range(STEPS)]


def reference_dion(model: nn.Module, lr: float, mu: float, rank: int | None, weight_decay: float,
                   adamw_lr: float) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    matrices = {n: p for n, p in params.items() if p.dim() >= 2}
    others = [p for p in params.values() if p.dim() < 2]
    adamw = torch.optim.AdamW(others, lr=adamw_lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    momentum, factor = {}, {}
    for name, p in matrices.items():
        m, n = p.shape[0], p[0].numel()
        r = min(m, n) if rank is None else min(rank, m, n)
        momentum[name] = torch.zeros(m, n, dtype=p.dtype)
        factor[name] = torch.randn(n, r, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())),
                                   dtype=p.dtype)
    for x, y in data():
        model.zero_grad()
        F.mse_loss(model(x), y).backward()
        adamw.step()
        with torch.no_grad():
            for name, p in matrices.items():
                m, n = p.shape[0], p[0].numel()
                b = momentum[name] + p.grad.reshape(m, n)
                q_factor, _ = torch.linalg.qr(b @ factor[name])
                r_factor = b.T @ q_factor
                momentum[name] = b - (1 - mu) * q_factor @ r_factor.T
                factor[name] = r_factor / (r_factor.norm(dim=0, keepdim=True) + 1e-8)
                p.mul_(1 - lr * weight_decay)
                p.sub_(lr * (m / n) ** 0.5 * (q_factor @ factor[name].T).reshape(p.shape))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("rank, weight_decay", [(None, 0.0), (2, 0.1)], ids=["full-rank", "rank-2-decay"])
def test_dion_takes_the_papers_step(one_thread, rank: int | None, weight_decay: float) -> None:
    lr, mu, adamw_lr = 0.02, 0.9, 0.01
    expected = reference_dion(make_model(), lr, mu, rank, weight_decay, adamw_lr)
    spec = f"dion(lr={lr}, momentum={mu}, rank={rank}, weight_decay={weight_decay}, adamw_lr={adamw_lr})"
    m = graphopt.compile(make_model(), methods=[spec], loss_fn=F.mse_loss, backend="eager")
    for x, y in data():
        m.step(x, y)
    for name, value in expected.items():
        torch.testing.assert_close(dict(m.named_parameters())[name], value, rtol=0, atol=1e-10, msg=name)
    state = m.optimizer_state()
    r = 2 if rank == 2 else 4  # conv: (4, 18): full rank 4
    assert state["conv.weight"]["q"].shape == (18, r) and state["conv.weight"]["momentum"].shape == (4, 2, 3, 3)
    assert set(state["conv.bias"]) == {"step", "exp_avg", "exp_avg_sq"}


def test_dion_options_are_checked() -> None:
    with pytest.raises(graphopt.OptionError, match="rank"):
        graphopt.compile(make_model(), methods=["dion(rank=0)"])
    with pytest.raises(graphopt.OptionError, match="momentum"):
        graphopt.compile(make_model(), methods=["dion(momentum=1.0)"])
