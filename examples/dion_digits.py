"""Dion vs Muon on scikit-learn's digits: the same MLP, the same batches, the same number of steps.

Dion (Ahn et al. 2025, "Dion: Distributed Orthonormalized Updates") replaces Muon's Newton–Schulz
orthogonalisation of the momentum by one step of power iteration with error feedback, at full rank or at a
lower ``rank=`` (less compute, and sharded weights never gathered). Both use AdamW for the biases.

    python examples/dion_digits.py            # eager backend
    python examples/dion_digits.py inductor   # compiled with torch.compile
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import graphopt

OPTIMIZERS = {
    "muon": "muon(lr=0.02, adamw_lr=0.003)",
    "dion (full rank)": "dion(lr=0.02, adamw_lr=0.003)",
    "dion (rank 16)": "dion(lr=0.02, rank=16, adamw_lr=0.003)",
}


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[order[:1437]], y[order[:1437]], x[order[1437:]], y[order[1437:]]


def train(spec: str, epochs: int = 10, backend: str = "eager", batch: int = 64, seed: int = 0) -> dict[str, float]:
    """Train the MLP with ``spec``; its final training loss, test accuracy and seconds spent in ``m.step``."""
    xtr, ytr, xte, yte = digits()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10))
    m = graphopt.compile(model, methods=[spec], loss_fn=F.cross_entropy, backend=backend,
                         example_inputs=(xtr[:batch],))
    gen = torch.Generator().manual_seed(seed)  # the same batches for every optimizer
    seconds = 0.0
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr) - batch + 1, batch):
            start = time.perf_counter()
            m.step(xtr[perm[i:i + batch]], ytr[perm[i:i + batch]])
            seconds += time.perf_counter() - start
    with torch.no_grad():
        m.eval()
        loss = F.cross_entropy(m(xtr), ytr).item()
        accuracy = (m(xte).argmax(1) == yte).float().mean().item()
    return {"train_loss": loss, "test_accuracy": accuracy, "step_seconds": seconds}


def main(backend: str = "eager", epochs: int = 10) -> dict[str, dict[str, float]]:
    results = {}
    for name, spec in OPTIMIZERS.items():
        results[name] = train(spec, epochs, backend)
        r = results[name]
        print(f"{name:18s} {spec:42s} train loss {r['train_loss']:.4f}  test accuracy {r['test_accuracy']:.3f}  "
              f"steps {r['step_seconds']:.1f} s", flush=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "eager")
