"""Bench case "layerdrop": progressive (Drop-Muon) step time vs full training, and Drop-Muon vs Muon on digits.

1. A 12-block residual MLP (``x + W2·relu(W1·LN(x))``): median step time of ``layerdrop(schedule="progressive")``
   vs the full step, same optimizer (sgd with momentum), measured side by side with ``graphopt.bench.time_steps``
   after every cutoff's graph was compiled. Backward covers (L+1)/2 blocks on average, the forward all of them.
2. scikit-learn digits (1437 train / 360 test images, 8×8): the same kind of model trained by ``muon`` and by
   ``layerdrop(schedule="progressive") + muon`` (Drop-Muon) with the same seeds and batches; steps and seconds
   until the full training-set loss reaches the target, and the test accuracy then.
Quick mode: eager backend, 6 blocks of width 128, one seed, target loss 0.1; full mode: 12 blocks, step time
with inductor (width 512), digits with the eager backend (12 graphs per run) and three seeds. The case runs
torch single-threaded (restored afterwards): on a shared, loaded machine two OpenMP threads per process made
step times swing by 10× and drowned the difference being measured.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.bench import ratios, time_steps


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class ResidualMLP(nn.Module):
    """stem → ``blocks`` residual blocks → LayerNorm → head."""

    def __init__(self, d_in: int, d: int, classes: int, blocks: int = 12) -> None:
        super().__init__()
        self.stem = nn.Linear(d_in, d)
        self.blocks = nn.Sequential(*[Block(d) for _ in range(blocks)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.stem(x))))


def _step_time(quick: bool) -> dict[str, Any]:
    d, batch, blocks = (128, 128, 6) if quick else (512, 256, 12)
    backend = "eager" if quick else "inductor"
    torch.manual_seed(0)
    x, y = torch.randn(batch, 64), torch.randint(0, 10, (batch,))
    models = {}
    for name, methods in {"full": ["sgd(lr=0.01, momentum=0.9)"],
                          "progressive": ["layerdrop(schedule='progressive')", "sgd(lr=0.01, momentum=0.9)"]}.items():
        torch.manual_seed(0)
        models[name] = graphopt.compile(ResidualMLP(64, d, 10, blocks), methods=methods, loss_fn=F.cross_entropy,
                                        backend=backend, example_inputs=(x,))
    start = time.perf_counter()
    prog = models["progressive"]
    while prog.compile_stats().traces < blocks:  # compile every cutoff's graph before timing
        prog.step(x, y)
    models["full"].step(x, y)
    compile_s = time.perf_counter() - start
    steps = 30 if quick else 100
    times = time_steps({n: (lambda m=m: m.step(x, y)) for n, m in models.items()}, steps=steps, warmup=2, block=10)
    return {"backend": backend, "width": d, "batch": batch, "blocks": blocks,
            "ms_per_step": {k: round(v, 2) for k, v in times.items()},
            "time_ratio_vs_full": ratios(times, "full"),
            "speedup_progressive": round(times["full"] / times["progressive"], 3),
            "variants_compiled": prog.compile_stats().traces, "compile_s": round(compile_s, 1)}


def digits_data() -> tuple[torch.Tensor, ...]:
    """scikit-learn's digits, standardised, split 1437/360 with a fixed permutation."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:1437], y[:1437], x[1437:], y[1437:]


def train_to_target(methods: list[str], seed: int, target: float, max_steps: int, backend: str,
                    width: int = 64, blocks: int = 12, batch: int = 64, every: int = 10) -> dict[str, Any]:
    """Train a residual MLP on digits until the full training-set loss is ≤ ``target`` (checked every ``every``).

    ``train_seconds`` sums the steps that ran an already compiled graph; steps that traced a new variant
    are counted in ``compile_seconds``.
    """
    xtr, ytr, xte, yte = digits_data()
    torch.manual_seed(seed)
    m = graphopt.compile(ResidualMLP(64, width, 10, blocks), methods=methods, loss_fn=F.cross_entropy,
                         backend=backend, example_inputs=(xtr[:batch],))
    gen = torch.Generator().manual_seed(seed)
    seconds, compile_seconds, step, reached = 0.0, 0.0, 0, None
    while step < max_steps and reached is None:
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr) - batch + 1, batch):
            idx = perm[i:i + batch]
            traces, start = m.compile_stats().traces, time.perf_counter()
            m.step(xtr[idx], ytr[idx])
            if m.compile_stats().traces > traces:  # this step traced (and compiled) a new graph variant
                compile_seconds += time.perf_counter() - start
            else:
                seconds += time.perf_counter() - start
            step += 1
            if step % every == 0:
                with torch.no_grad():
                    loss = F.cross_entropy(m.eval()(xtr), ytr).item()
                m.train()
                if loss <= target:
                    reached = step
                    break
            if step >= max_steps:
                break
    with torch.no_grad():
        accuracy = (m.eval()(xte).argmax(1) == yte).float().mean().item()
    return {"steps": reached, "train_seconds": round(seconds, 2), "compile_seconds": round(compile_seconds, 2),
            "test_accuracy": round(accuracy, 4),
            "graphs_compiled": m.compile_stats().traces}


def _digits(quick: bool) -> dict[str, Any]:
    if "muon" not in graphopt.list_methods():
        return {"skipped": "muon is not available"}
    seeds = [0] if quick else [0, 1, 2]
    backend, blocks = "eager", (6 if quick else 12)
    target = 0.1 if quick else 0.05
    runs: dict[str, list[dict[str, Any]]] = {"muon": [], "drop_muon": []}
    for seed in seeds:
        runs["muon"].append(train_to_target(["muon(lr=0.02, adamw_lr=0.003)"], seed, target, 3000, backend,
                                            blocks=blocks))
        runs["drop_muon"].append(train_to_target(
            [f"layerdrop(schedule='progressive', seed={seed})", "muon(lr=0.02, adamw_lr=0.003)"],
            seed, target, 3000, backend, blocks=blocks))
    result: dict[str, Any] = {"target_train_loss": target, "seeds": seeds, "backend": backend, "blocks": blocks,
                              "runs": runs}
    if all(r["steps"] for rs in runs.values() for r in rs):
        steps = {k: statistics.mean(r["steps"] for r in v) for k, v in runs.items()}
        secs = {k: statistics.mean(r["train_seconds"] for r in v) for k, v in runs.items()}
        result["mean_steps"] = {k: round(v, 1) for k, v in steps.items()}
        result["mean_seconds"] = {k: round(v, 2) for k, v in secs.items()}
        result["drop_muon_wallclock_speedup"] = round(secs["muon"] / secs["drop_muon"], 3)
        result["drop_muon_step_ratio"] = round(steps["drop_muon"] / steps["muon"], 3)
    return result


def bench_layerdrop(quick: bool) -> dict[str, Any]:
    """The "layerdrop" case: step time of progressive vs full, and Drop-Muon vs Muon on digits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {"threads": 1, "step_time": _step_time(quick), "digits": _digits(quick)}
    finally:
        torch.set_num_threads(threads)
