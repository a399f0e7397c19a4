"""Bench case ``tract``: the per-step cost of TrAct's first-layer gradient, side by side with the plain model.

(a) a CIFAR-shaped CNN, ``Conv2d(3, 64, 3)`` first, batch 128 of 3×32×32 (target: ≤ 3% overhead);
(b) an MLP on 64-dim inputs, batch 256. Both are trained with graphopt's fused ``sgd`` step compiled by
inductor, with and without ``tract``; timings are interleaved medians (``graphopt.bench.time_steps``),
plus the CPU time of one thread per step (robust to a loaded machine) and, in full mode, peak memory.
Quick mode times only (a), with fewer steps; its run time is dominated by the two inductor compiles.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.bench import peak_memory_mib, ratios, time_steps


def cifar_cnn() -> nn.Module:
    """A small CIFAR-style CNN whose first layer is ``Conv2d(3, 64, 3)``."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 3), nn.ReLU(),                          # 30×30
        nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),    # 15×15
        nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(),   # 8×8
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )


def mlp() -> nn.Module:
    """An MLP on 64-dim inputs (the shape of scikit-learn's digits)."""
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def cpu_ms_per_step(variants: dict[str, Any], steps: int, rounds: int = 3) -> dict[str, float]:
    """Median CPU time (``time.thread_time``) per step on one thread, variants interleaved round by round.

    On a shared, overloaded machine wall-clock medians of multi-threaded steps mostly measure how
    often the OpenMP workers were descheduled; one thread's CPU time measures the work itself.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for fn in variants.values():
            fn()  # a new thread count makes dynamo recompile: keep that out of the timing
        for _ in range(rounds):
            for name, fn in variants.items():
                start = time.thread_time()
                for _ in range(steps):
                    fn()
                samples[name].append((time.thread_time() - start) * 1000 / steps)
    finally:
        torch.set_num_threads(threads)
    return {name: round(sorted(v)[len(v) // 2], 3) for name, v in samples.items()}


def _compare(make: Any, x: torch.Tensor, target: torch.Tensor, steps: int, memory: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    base = make()
    models = {
        "plain": graphopt.compile(base, methods=["sgd(lr=0.01)"], loss_fn=F.cross_entropy, backend="inductor"),
        "tract": graphopt.compile(base, methods=["tract", "sgd(lr=0.01)"], loss_fn=F.cross_entropy,
                                  backend="inductor"),
    }
    variants = {name: (lambda m=m: m.step(x, target)) for name, m in models.items()}
    times = time_steps(variants, steps=steps, warmup=3, block=max(1, steps // 6), progress=False)
    result: dict[str, Any] = {"ms_per_step": {k: round(v, 3) for k, v in times.items()},
                              "ratio_vs_plain": ratios(times, "plain")}
    result["overhead_pct"] = round(100 * (times["tract"] / times["plain"] - 1), 1)
    cpu = cpu_ms_per_step(variants, max(1, steps // 6))
    result["cpu_ms_per_step_1thread"] = cpu
    result["cpu_overhead_pct_1thread"] = round(100 * (cpu["tract"] / cpu["plain"] - 1), 1)
    if memory:
        result["peak_mib"] = {name: peak_memory_mib(fn) for name, fn in variants.items()}
    return result


def run_case(quick: bool) -> dict[str, Any]:
    """Both models, plain vs tract, inductor; quick mode times only the CNN (a) and takes fewer steps."""
    gen = torch.Generator().manual_seed(0)
    x_img = torch.randn(128, 3, 32, 32, generator=gen)
    t_img = torch.randint(0, 10, (128,), generator=gen)
    x_vec = torch.randn(256, 64, generator=gen)
    t_vec = torch.randint(0, 10, (256,), generator=gen)
    if quick:
        cnn = _compare(cifar_cnn, x_img, t_img, 6, memory=False)
        return {"cnn_b128_3x32x32": cnn, "cnn_overhead_pct": cnn["overhead_pct"],
                "cnn_cpu_overhead_pct_1thread": cnn["cpu_overhead_pct_1thread"]}
    cnn = _compare(cifar_cnn, x_img, t_img, 36, memory=True)
    dense = _compare(mlp, x_vec, t_vec, 300, memory=True)
    return {
        "cnn_b128_3x32x32": cnn,
        "mlp_b256_64": dense,
        "cnn_overhead_pct": cnn["overhead_pct"],
        "mlp_overhead_pct": dense["overhead_pct"],
        "cnn_cpu_overhead_pct_1thread": cnn["cpu_overhead_pct_1thread"],
        "mlp_cpu_overhead_pct_1thread": dense["cpu_overhead_pct_1thread"],
        "cnn_target_met(<=3%)": cnn["overhead_pct"] <= 3.0,
    }
