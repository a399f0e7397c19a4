"""Benchmark case ``oftv2`` (``graphopt bench``): OFTv2 against full fine-tuning and a weight-centric OFT.

Model: 4 blocks of ``Linear(d, d) + GELU`` on input ``(32, 64, d)``, d = 1024 (quick: d = 256, input
``(8, 32, 256)``), MSE loss, AdamW (``adamw`` when registered, else ``sgd``; the result says which).
Variants, measured side by side in one call (interleaved blocks, median ms/step after warm-up):

- ``full_eager``: full fine-tuning in plain PyTorch, ``torch.optim.AdamW`` (foreach);
- ``full_graphopt``: full fine-tuning through graphopt (fused optimizer method, inductor), no adapter;
- ``oft_weight_eager``: weight-centric exact OFT written here: every step builds ``R_j = (I+Q_j)(I−Q_j)⁻¹``
  by a solve, forms ``W′ = W R_bdᵀ`` (one ``out × in × b`` product per layer) and runs ``F.linear(x, W′)``;
  ``torch.optim.AdamW`` on ``q``;
- ``oft_weight_graphopt``: the same module compiled as a training step by graphopt (inductor), to
  separate the weight-centric/input-centric question from the compile question;
- ``oftv2``: graphopt ``oftv2(block_size=32, neumann_terms=4)`` (input-centric), inductor.

Reported: ms/step, ratios to both full fine-tuning variants and to the weight-centric baselines, and
peak tensor memory of one step (torch.profiler memory timeline, parameters and optimizer state included).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.bench import peak_memory_mib, ratios, time_steps

from .common import eager_training_step, linear_gelu_stack


class WeightCentricOFT(nn.Module):
    """Baseline: ``y = x (W R_bdᵀ)ᵀ + b`` with exact Cayley blocks, ``W R_bdᵀ`` formed on every call."""

    def __init__(self, linear: nn.Linear, block_size: int) -> None:
        super().__init__()
        self.block_size = block_size
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        b = block_size
        self.q = nn.Parameter(torch.zeros(linear.in_features // b, b * (b - 1) // 2))
        self.register_buffer("rows", torch.triu_indices(b, b, 1)[0], persistent=False)
        self.register_buffer("cols", torch.triu_indices(b, b, 1)[1], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n = self.block_size, self.q.shape[0]
        upper = torch.zeros(n, b, b, dtype=self.q.dtype)
        upper = upper.index_put((torch.arange(n)[:, None], self.rows, self.cols), self.q)
        skew = upper - upper.transpose(-1, -2)
        eye = torch.eye(b, dtype=self.q.dtype)
        rotation = torch.linalg.solve(eye - skew, eye + skew)  # (I−Q)⁻¹(I+Q) = (I+Q)(I−Q)⁻¹
        weight = torch.einsum("ojc,jac->oja", self.weight.reshape(-1, n, b), rotation).reshape(self.weight.shape)
        return F.linear(x, weight, self.bias)


def _weight_centric(model: nn.Sequential, block_size: int) -> nn.Sequential:
    return nn.Sequential(*[WeightCentricOFT(m, block_size) if isinstance(m, nn.Linear) else m for m in model])


def _eager_step(model: nn.Module, lr: float, x: torch.Tensor, target: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]
    return eager_training_step(model, torch.optim.AdamW(params, lr=lr, weight_decay=0.0), x, target)


def bench_oftv2(quick: bool) -> dict[str, Any]:
    """Case ``oftv2``: see the module docstring."""
    d, depth, shape, steps, block = (256, 4, (8, 32), 10, 2) if quick else (1024, 4, (32, 64), 20, 5)
    b, k, lr = 32, 4, 1e-4
    torch.manual_seed(0)
    base = linear_gelu_stack(d, depth)
    x = torch.randn(*shape, d)
    target = torch.randn(*shape, d)
    opt_spec = "adamw(lr=1e-4, weight_decay=0.0)" if "adamw" in graphopt.list_methods() else "sgd(lr=1e-4)"

    weight_model = _weight_centric(copy.deepcopy(base), b)
    full_go = graphopt.compile(base, methods=[opt_spec], loss_fn=F.mse_loss, example_inputs=(x,))
    weight_go = graphopt.compile(weight_model, methods=[opt_spec], loss_fn=F.mse_loss, example_inputs=(x,))
    oft_go = graphopt.compile(base, methods=[f"oftv2(block_size={b}, neumann_terms={k})", opt_spec],
                              loss_fn=F.mse_loss, example_inputs=(x,))
    assert sorted(n for n, _ in weight_go.named_parameters()) == [f"{i}.q" for i in range(0, 2 * depth, 2)]
    variants = {
        "full_eager": _eager_step(copy.deepcopy(base), lr, x, target),
        "full_graphopt": lambda: full_go.step(x, target),
        "oft_weight_eager": _eager_step(copy.deepcopy(weight_model), lr, x, target),
        "oft_weight_graphopt": lambda: weight_go.step(x, target),
        "oftv2": lambda: oft_go.step(x, target),
    }
    times = time_steps(variants, steps=steps, warmup=3, block=block)
    memory = {name: peak_memory_mib(fn) for name, fn in variants.items()}
    full_best = min(times["full_eager"], times["full_graphopt"])
    weight_best = min(times["oft_weight_eager"], times["oft_weight_graphopt"])
    return {
        "shape": f"{depth}x Linear({d},{d})+GELU, input {(*shape, d)}, block_size={b}, K={k}, optimizer {opt_spec}",
        "threads": torch.get_num_threads(),
        "ms_per_step": {name: round(t, 2) for name, t in times.items()},
        "vs_full_eager": ratios(times, "full_eager"),
        "vs_full_graphopt": ratios(times, "full_graphopt"),
        "oftv2_vs_best_full": round(times["oftv2"] / full_best, 3),
        "oftv2_vs_best_weight_centric": round(times["oftv2"] / weight_best, 3),
        "peak_mib": memory,
        "oftv2_mem_vs_full_eager": round(memory["oftv2"] / memory["full_eager"], 3),
        "oftv2_mem_vs_full_graphopt": round(memory["oftv2"] / memory["full_graphopt"], 3),
        "targets_met": {"time_le_0.85x_full": times["oftv2"] <= 0.85 * full_best,
                        "faster_than_weight_centric": times["oftv2"] < weight_best,
                        "memory_le_full": memory["oftv2"] <= min(memory["full_eager"], memory["full_graphopt"])},
    }
