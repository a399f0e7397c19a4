"""Drop-Muon vs Muon on scikit-learn's digits: a 12-block residual MLP trained to the same training loss.

Drop-Muon (Gruntkowska et al. 2025, arXiv:2510.02239) is Muon with randomized progressive training: each step
draws a cutoff block ``s`` uniformly; blocks below ``s`` get no gradient and no update, and backward stops at
``s``. In graphopt that is two method specs: ``layerdrop(schedule="progressive")`` + ``muon``. Without the
``muon`` method installed the example compares against sgd instead.

    python examples/drop_muon_digits.py            # eager backend
    python examples/drop_muon_digits.py inductor   # compiled with torch.compile
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import graphopt


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))  # x + f(x): found by layerdrop


class ResidualMLP(nn.Module):
    def __init__(self, d: int = 64, blocks: int = 12) -> None:
        super().__init__()
        self.stem = nn.Linear(64, d)
        self.blocks = nn.Sequential(*[Block(d) for _ in range(blocks)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.stem(x))))


def main(backend: str = "eager", target: float = 0.05, seed: int = 0, batch: int = 64) -> None:
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    xtr, ytr, xte, yte = x[order[:1437]], y[order[:1437]], x[order[1437:]], y[order[1437:]]

    optimizer = "muon(lr=0.02, adamw_lr=0.003)" if "muon" in graphopt.list_methods() else "sgd(lr=0.05, momentum=0.9)"
    runs = {optimizer: [optimizer], f"progressive layerdrop + {optimizer}": ["layerdrop(schedule='progressive')",
                                                                             optimizer]}
    for name, methods in runs.items():
        torch.manual_seed(seed)
        m = graphopt.compile(ResidualMLP(), methods=methods, loss_fn=F.cross_entropy, backend=backend,
                             example_inputs=(xtr[:batch],))
        if "layerdrop" in methods[0]:
            print(f"{len(m.layerdrop_blocks())} blocks found:", ", ".join(b.path for b in m.layerdrop_blocks()))
        gen = torch.Generator().manual_seed(seed)  # the same batches for both runs
        step, seconds, loss = 0, 0.0, float("inf")
        while loss > target and step < 3000:
            perm = torch.randperm(len(xtr), generator=gen)
            for i in range(0, len(xtr) - batch + 1, batch):
                start = time.perf_counter()
                m.step(xtr[perm[i:i + batch]], ytr[perm[i:i + batch]])
                seconds += time.perf_counter() - start
                step += 1
                if step % 10 == 0:
                    with torch.no_grad():
                        loss = F.cross_entropy(m.eval()(xtr), ytr).item()
                    m.train()
                    if loss <= target:
                        break
        with torch.no_grad():
            accuracy = (m.eval()(xte).argmax(1) == yte).float().mean().item()
        print(f"{name:45s} train loss {loss:.4f} after {step} steps, {seconds:.1f} s of steps (tracing included), "
              f"test accuracy {accuracy:.3f}, {m.compile_stats().traces} graphs compiled")


if __name__ == "__main__":
    main(*sys.argv[1:2])
