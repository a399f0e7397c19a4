"""Every built-in optimizer on one model: scikit-learn's digits, an MLP 64-128-128-10, one line of spec each.

For each optimizer (sgd, adamw, muon and the Muon family: normuon, adamuon, adago, auon, Hybrid-AuON,
turbo_muon, root) the script sweeps a small lr grid on a validation split (seed 0), keeps the lr that reaches
95% validation accuracy in the fewest steps and is still above it after the last step (or, if none is, the
best final validation accuracy), then
trains 3 seeds at that lr and reports steps and seconds to 95% *test* accuracy (evaluated every 5 steps;
seconds count the training steps after the first, which traces the graph), the final test accuracy, and saves
the training-loss curves (mean over the seeds) to ``out/optimizer_zoo.png``.

    python examples/optimizer_zoo.py            # eager backend (the traced step run as is)
    python examples/optimizer_zoo.py inductor   # compiled with torch.compile (adds ~10 s per compile)
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import graphopt

STEPS, BATCH, TARGET, EVAL_EVERY, SEEDS = 300, 64, 0.95, 5, (0, 1, 2)

# name: (spec template with {lr}, lr grid). Adam-scale rules (RMS-matched updates) share their lr with AdamW.
OPTIMIZERS: dict[str, tuple[str, tuple[float, ...]]] = {
    "sgd": ("sgd(lr={lr}, momentum=0.9)", (0.03, 0.1, 0.3)),
    "adamw": ("adamw(lr={lr})", (1e-3, 3e-3, 1e-2)),
    "muon": ("muon(lr={lr}, adamw_lr=3e-3)", (0.01, 0.03, 0.1)),
    "normuon": ("normuon(lr={lr}, adamw_lr={lr})", (1e-3, 3e-3, 1e-2)),
    "adamuon": ("adamuon(lr={lr}, adamw_lr={lr})", (1e-3, 3e-3, 1e-2)),
    "adago": ("adago(lr={lr}, adamw_lr=3e-3)", (0.1, 0.3, 1.0)),
    "auon": ("auon(lr={lr}, adamw_lr=3e-3)", (0.03, 0.1, 0.3)),
    "hybrid-auon": ("auon(lr={lr}, hybrid=True, adamw_lr=3e-3)", (0.03, 0.1, 0.3)),
    "turbo_muon": ("turbo_muon(lr={lr}, adamw_lr=3e-3)", (0.01, 0.03, 0.1)),
    "root": ("root(lr={lr}, adamw_lr={lr})", (1e-3, 3e-3, 1e-2)),
}


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def load() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    images, labels = load_digits(return_X_y=True)
    x_rest, x_test, y_rest, y_test = train_test_split(images, labels, test_size=0.25, stratify=labels, random_state=0)
    x_train, x_val, y_train, y_val = train_test_split(x_rest, y_rest, test_size=0.2, stratify=y_rest, random_state=0)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    return {name: (torch.tensor((x - mean) / std, dtype=torch.float32), torch.tensor(y))
            for name, x, y in (("train", x_train, y_train), ("val", x_val, y_val), ("test", x_test, y_test))}


def batches(n: int, seed: int):
    """Shuffled minibatch indices, epoch after epoch (the last partial batch dropped)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=gen)
        yield from (order[i:i + BATCH] for i in range(0, n - BATCH + 1, BATCH))


def train(spec: str, seed: int, data, evaluate_on: str, backend: str) -> dict:
    """``STEPS`` steps of ``spec`` from seed ``seed``; accuracy on ``evaluate_on`` every ``EVAL_EVERY`` steps."""
    torch.manual_seed(seed)
    m = graphopt.compile(make_model(), methods=[spec], loss_fn=F.cross_entropy, backend=backend)
    (x, y), (x_eval, y_eval) = data["train"], data[evaluate_on]
    losses, seconds, reached, accuracy = [], 0.0, None, 0.0
    for step, batch in zip(range(1, STEPS + 1), batches(len(x), seed)):
        began = time.perf_counter()
        losses.append(m.step(x[batch], y[batch]).item())
        if step > 1:  # the first step traces (and compiles) the training graph
            seconds += time.perf_counter() - began
        if step % EVAL_EVERY == 0:
            with torch.no_grad():
                accuracy = (m.eval()(x_eval).argmax(1) == y_eval).float().mean().item()
            m.train()
            if reached is None and accuracy >= TARGET:
                reached = (step, seconds)
    return {"losses": losses, "reached": reached, "accuracy": accuracy}


def sweep(template: str, grid: tuple[float, ...], data, backend: str) -> float:
    """The lr of ``grid`` that reaches the target on the validation split first among those still above it at
    the end (a fast lr that later diverges is not taken); the best final accuracy if none stays above it."""
    results = {lr: train(template.format(lr=lr), SEEDS[0], data, "val", backend) for lr in grid}
    stable = [lr for lr in grid if results[lr]["reached"] and results[lr]["accuracy"] >= TARGET]
    if not stable:
        return max(grid, key=lambda lr: results[lr]["accuracy"])
    return min(stable, key=lambda lr: (results[lr]["reached"][0], -results[lr]["accuracy"]))


def main(backend: str = "eager") -> None:
    torch.set_num_threads(1)  # 128-wide matrices: one thread beats two (no OpenMP hand-offs), and leaves a core
    data = load()
    began = time.perf_counter()
    rows, curves = [], {}
    for name, (template, grid) in OPTIMIZERS.items():
        lr = sweep(template, grid, data, backend)
        runs = [train(template.format(lr=lr), seed, data, "test", backend) for seed in SEEDS]
        curves[name] = [statistics.mean(values) for values in zip(*(run["losses"] for run in runs))]
        reached = [run["reached"] for run in runs]
        steps = [f"{r[0]}" if r else "-" for r in reached]
        seconds = [f"{r[1]:.2f}" if r else "-" for r in reached]
        accuracy = statistics.mean(run["accuracy"] for run in runs)
        rows.append((name, lr, steps, seconds, accuracy))
        print(f"{name:12s} lr={lr:<7g} steps to {TARGET:.0%} test acc: {', '.join(steps):15s} "
              f"seconds: {', '.join(seconds):20s} final test acc {accuracy:.3f}", flush=True)
    print(f"total {time.perf_counter() - began:.0f} s ({backend} backend, {torch.get_num_threads()} threads)")
    save_plot(curves)


def save_plot(curves: dict[str, list[float]], path: Path = Path("out/optimizer_zoo.png")) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = 10
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, losses in curves.items():
        smooth = [statistics.mean(losses[max(0, i - window + 1):i + 1]) for i in range(len(losses))]
        ax.plot(range(1, len(smooth) + 1), smooth, label=name, linestyle="--" if name in ("sgd", "adamw") else "-")
    ax.set(xlabel="step", ylabel=f"training loss (mean of {len(SEEDS)} seeds, {window}-step average)",
           yscale="log", title="digits, MLP 64-128-128-10, batch 64: every built-in optimizer at its swept lr")
    ax.legend(ncol=2, fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
