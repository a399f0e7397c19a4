"""Bench cases of the fused optimizers: an MLP 4×Linear(1024, 1024) (ReLU between), batch 64, cross-entropy.

The Muon family (``optim: normuon`` … ``optim: root``) times each fused step against its own eager
``torch.optim`` reference (``eager_family``, the test's formula), default options.

Each case times the variants side by side (``graphopt.bench.time_steps``, interleaved medians) and
measures the peak tensor memory of one step (``graphopt.bench.peak_memory_mib``: parameters, optimizer
state, gradients and activations alive at once). Eager baselines: torch.optim with ``fused=True`` and
``foreach=True``, and the optimizer-in-backward pattern (one optimizer per parameter stepped from a
``register_post_accumulate_grad_hook``, gradients freed as they are used). graphopt runs the whole step
(forward, loss, backward, per-parameter update) as one graph compiled with inductor, and with
``backend="eager"`` (the traced graph run as is).

``graphopt_inductor`` is the default step, ``on_nonfinite="raise"``: it checks the loss and every gradient
for inf/NaN and writes the updates only when all are finite, so every update waits for the whole backward
pass. torch.optim checks nothing; ``graphopt_unguarded`` (``on_nonfinite="apply"``) is the step with the same
semantics, each update issued as soon as its gradient exists. The targets are judged on it; the default is
shown beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.bench import inductor_buffer_peak_mib, peak_memory_mib, ratios, time_steps

from .eager_family import EAGER

WIDTH, DEPTH, BATCH = 1024, 4, 64


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(DEPTH):
        layers.append(nn.Linear(WIDTH, WIDTH))
        if i < DEPTH - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, WIDTH, generator=gen), torch.randint(0, WIDTH, (BATCH,), generator=gen)


def eager_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return step


def in_backward_step(model: nn.Module, make: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
                     x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """Optimizer-in-backward: each parameter steps (and drops its gradient) as soon as it is accumulated."""
    optimizers = {p: make([p]) for p in model.parameters()}

    def hook(param: torch.Tensor) -> None:
        optimizers[param].step()
        optimizers[param].zero_grad(set_to_none=True)

    for param in model.parameters():
        param.register_post_accumulate_grad_hook(hook)

    def step() -> None:
        F.cross_entropy(model(x), y).backward()
    return step


class GraphoptStep:
    """``m.step(x, y)`` of a fresh compiled model; keeps ``m`` for the memory accounting."""

    def __init__(self, spec: str, backend: str, x: torch.Tensor, y: torch.Tensor,
                 on_nonfinite: str | None = None) -> None:
        self.m = graphopt.compile(make_model(), methods=[spec], loss_fn=F.cross_entropy, backend=backend,
                                  on_nonfinite=on_nonfinite)
        self.x, self.y = x, y

    def __call__(self) -> None:
        self.m.step(self.x, self.y)

    def resident_mib(self) -> float:
        """Parameters, optimizer state and the batch: the tensors alive before a step."""
        tensors = [p for _, p in self.m.named_parameters()]
        tensors += [v for slots in self.m.optimizer_state().values() for v in slots.values()] + [self.x, self.y]
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def inductor_peak_mib(step: GraphoptStep) -> float:
    """Peak tensor memory of one inductor-compiled step: resident tensors plus the most bytes of the buffers
    inductor's wrapper allocates that are alive at once (``graphopt.bench.inductor_buffer_peak_mib``)."""
    return round(step.resident_mib() + inductor_buffer_peak_mib(step), 2)


def measure(variants: dict[str, Callable[[], Any]], baseline: str, quick: bool) -> dict[str, Any]:
    for fn in variants.values():  # compiles happen here, outside timing and memory
        fn()
        fn()
    times = time_steps(variants, steps=10 if quick else 40, warmup=1 if quick else 3, block=5)
    memory = {name: inductor_peak_mib(fn) if name in INDUCTOR_VARIANTS else peak_memory_mib(fn)
              for name, fn in variants.items()}
    return {
        "ms_per_step": {k: round(v, 2) for k, v in times.items()},
        "time_vs_" + baseline: ratios(times, baseline),
        "peak_mib": memory,
        "model": f"{DEPTH}xLinear({WIDTH},{WIDTH}) batch {BATCH} float32, threads {torch.get_num_threads()}",
    }


def with_targets(result: dict[str, Any], baseline: str, target: float,
                 memory_reference: str | None = None) -> dict[str, Any]:
    """Whether the unguarded step (torch.optim's semantics) meets its time target against ``baseline`` and
    its peak memory is at most ``memory_reference``'s."""
    times, memory = result["ms_per_step"], result["peak_mib"]
    result[f"target_time_le_{target}x_{baseline}"] = times["graphopt_unguarded"] <= target * times[baseline]
    if memory_reference is not None:
        result["target_memory_le_" + memory_reference] = memory["graphopt_unguarded"] <= memory[memory_reference]
    return result


INDUCTOR_VARIANTS = ("graphopt_inductor", "graphopt_unguarded")


def graphopt_variants(spec: str, x: torch.Tensor, y: torch.Tensor) -> dict[str, GraphoptStep]:
    """The default step and the unguarded one compiled with inductor, and the traced graph run eagerly."""
    return {"graphopt_inductor": GraphoptStep(spec, "inductor", x, y),
            "graphopt_unguarded": GraphoptStep(spec, "inductor", x, y, on_nonfinite="apply"),
            "graphopt_eager": GraphoptStep(spec, "eager", x, y)}


def bench_adamw(quick: bool) -> dict[str, Any]:
    x, y = make_data()
    lr = 1e-3
    fused, foreach, in_backward = make_model(), make_model(), make_model()
    variants = {
        "eager_fused": eager_step(fused, torch.optim.AdamW(fused.parameters(), lr=lr, fused=True), x, y),
        "eager_foreach": eager_step(foreach, torch.optim.AdamW(foreach.parameters(), lr=lr, foreach=True), x, y),
        "eager_in_backward": in_backward_step(in_backward, lambda p: torch.optim.AdamW(p, lr=lr, fused=True), x, y),
        **graphopt_variants(f"adamw(lr={lr})", x, y),
    }
    return with_targets(measure(variants, "eager_fused", quick), "eager_fused", 0.87, "eager_in_backward")


def bench_sgd(quick: bool) -> dict[str, Any]:
    x, y = make_data()
    opts = {"lr": 0.01, "momentum": 0.9}
    fused, foreach, in_backward = make_model(), make_model(), make_model()
    variants = {
        "eager_fused": eager_step(fused, torch.optim.SGD(fused.parameters(), **opts, fused=True), x, y),
        "eager_foreach": eager_step(foreach, torch.optim.SGD(foreach.parameters(), **opts, foreach=True), x, y),
        "eager_in_backward": in_backward_step(in_backward, lambda p: torch.optim.SGD(p, **opts, fused=True), x, y),
        **graphopt_variants("sgd(lr=0.01, momentum=0.9)", x, y),
    }
    return with_targets(measure(variants, "eager_fused", quick), "eager_fused", 0.9, "eager_in_backward")


class EagerMuon(torch.optim.Optimizer):
    """Plain eager Muon (Jordan et al. 2024) as Jordan et al. 2024 states it, for the baseline: Newton–Schulz on
    the Nesterov momentum of matrices, AdamW(betas=(0.9, 0.95), wd=0) with ``adamw_lr`` for the rest."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, adamw_lr: float = 3e-4) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "adamw_lr": adamw_lr})

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if p.dim() >= 2:
                    buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
                    buf.mul_(group["momentum"]).add_(g)
                    n = g.add(buf, alpha=group["momentum"]).reshape(p.shape[0], -1)
                    rows, cols = n.shape
                    xm = n.T if rows > cols else n
                    xm = xm / xm.norm()
                    for _ in range(5):
                        a = xm @ xm.T
                        xm = 3.4445 * xm + (-4.7750 * a + 2.0315 * a @ a) @ xm
                    xm = xm.T if rows > cols else xm
                    p.add_(xm.view_as(p), alpha=-group["lr"] * max(1.0, rows / cols) ** 0.5)
                else:
                    t = state["step"] = state.get("step", 0) + 1
                    m = state.setdefault("exp_avg", torch.zeros_like(p))
                    v = state.setdefault("exp_avg_sq", torch.zeros_like(p))
                    m.lerp_(g, 0.1)
                    v.mul_(0.95).addcmul_(g, g, value=0.05)
                    denom = (v.sqrt() / (1 - 0.95 ** t) ** 0.5).add_(1e-8)
                    p.addcdiv_(m, denom, value=-group["adamw_lr"] / (1 - 0.9 ** t))


def bench_muon(quick: bool) -> dict[str, Any]:
    x, y = make_data()
    eager, in_backward = make_model(), make_model()
    variants = {
        "eager_muon": eager_step(eager, EagerMuon(eager.parameters()), x, y),
        "eager_in_backward": in_backward_step(in_backward, lambda p: EagerMuon(p), x, y),
        **graphopt_variants("muon", x, y),
    }
    return with_targets(measure(variants, "eager_muon", quick), "eager_muon", 0.8, "eager_in_backward")



# -- the Muon family: each fused step against its own eager reference -------------------------------------------
def bench_family(name: str, quick: bool) -> dict[str, Any]:
    """``name``'s graphopt step (inductor, and the eager graph) against its eager ``torch.optim`` reference
    (``benchmarks.eager_family``: the formula of the test's reference), default options, side by side."""
    x, y = make_data()
    eager = make_model()
    variants = {
        "eager_reference": eager_step(eager, EAGER[name](eager.parameters()), x, y),
        **graphopt_variants(name, x, y),
    }
    return with_targets(measure(variants, "eager_reference", quick), "eager_reference", 0.8)


def bench_normuon(quick: bool) -> dict[str, Any]:
    return bench_family("normuon", quick)


def bench_adamuon(quick: bool) -> dict[str, Any]:
    return bench_family("adamuon", quick)


def bench_adago(quick: bool) -> dict[str, Any]:
    return bench_family("adago", quick)


def bench_auon(quick: bool) -> dict[str, Any]:
    return bench_family("auon", quick)


def bench_turbo_muon(quick: bool) -> dict[str, Any]:
    return bench_family("turbo_muon", quick)


def bench_root(quick: bool) -> dict[str, Any]:
    return bench_family("root", quick)
