"""Benchmark cases of the adapter methods (``graphopt bench``), measured side by side in one call.

Case ``hra``: 4 blocks of ``Linear(d, d) + GELU`` on input ``(32, 64, d)`` (d = 1024; quick: a smaller
model), MSE loss, AdamW (``adamw`` when registered, else ``sgd``; the result says which). Variants:

- ``full_eager``: full fine-tuning in plain PyTorch with ``torch.optim.AdamW`` (``foreach``);
- ``full_graphopt``: full fine-tuning through graphopt with the same optimizer method and no adapter;
- ``hra_dense``: a weight-centric HRA written here: every step forms ``R = H_1⋯H_r`` densely (r rank-1
  updates of a d×d matrix), then ``W R`` (a d³ product) and runs the layer on it; ``torch.optim.AdamW``;
- ``hra``: graphopt ``hra(r=8)`` (compact WY form; the step trains each input transform fused with its
  linear layer, ``graphopt.builtin.reflected_linear``), inductor. Target: ≤ 0.75× the faster full fine-tuning
  (a frozen base needs two of its three GEMMs: the limit is ≈ 0.67×).

Quick mode: d = 256, input ``(8, 32, 256)``, 10 steps, and no ``full_graphopt`` (one inductor compile
fewer, to stay under a minute).

Reported: median ms/step (interleaved blocks after warm-up), ratios to both full fine-tuning variants,
and peak tensor memory of one step (torch.profiler memory timeline).
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


class DenseHRA(nn.Module):
    """Weight-centric HRA baseline: ``y = x (W H_1⋯H_r)ᵀ + b``, the product formed densely every call."""

    def __init__(self, linear: nn.Linear, r: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        half = torch.empty(linear.in_features, r // 2).uniform_(-(2 / r) ** 0.5, (2 / r) ** 0.5)
        self.u = nn.Parameter(half.repeat_interleave(2, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unit = self.u / self.u.norm(dim=0, keepdim=True)
        rot = torch.eye(unit.shape[0], dtype=unit.dtype)
        for i in range(unit.shape[1]):
            col = unit[:, i:i + 1]
            rot = rot - 2 * (rot @ col) @ col.t()
        return F.linear(x, self.weight @ rot, self.bias)


def _dense_hra_model(model: nn.Sequential, r: int) -> nn.Sequential:
    return nn.Sequential(*[DenseHRA(m, r) if isinstance(m, nn.Linear) else m for m in model])


def bench_hra(quick: bool) -> dict[str, Any]:
    """Case ``hra``: see the module docstring."""
    d, depth, shape, steps, r = (256, 4, (8, 32), 10, 8) if quick else (1024, 4, (32, 64), 20, 8)
    torch.manual_seed(0)
    base = linear_gelu_stack(d, depth)
    x = torch.randn(*shape, d)
    target = torch.randn(*shape, d)
    methods = graphopt.list_methods()
    opt_spec = "adamw(lr=1e-4, weight_decay=0.0)" if "adamw" in methods else "sgd(lr=1e-4)"
    lr = 1e-4

    full_model = copy.deepcopy(base)
    full_eager = eager_training_step(full_model, torch.optim.AdamW(full_model.parameters(), lr=lr, weight_decay=0.0),
                             x, target)
    dense_model = _dense_hra_model(copy.deepcopy(base), r)
    dense_params = [p for p in dense_model.parameters() if p.requires_grad]
    hra_dense = eager_training_step(dense_model, torch.optim.AdamW(dense_params, lr=lr, weight_decay=0.0), x, target)

    hra_go = graphopt.compile(base, methods=[f"hra(r={r})", opt_spec], loss_fn=F.mse_loss, example_inputs=(x,))
    variants = {"full_eager": full_eager}
    if not quick:  # quick mode skips this second inductor compile to stay under a minute
        full_go = graphopt.compile(base, methods=[opt_spec], loss_fn=F.mse_loss, example_inputs=(x,))
        variants["full_graphopt"] = lambda: full_go.step(x, target)
    variants["hra_dense"] = hra_dense
    variants["hra"] = lambda: hra_go.step(x, target)
    times = time_steps(variants, steps=steps, warmup=3, block=5 if not quick else 2)
    memory = {name: peak_memory_mib(fn) for name, fn in variants.items()}
    fulls = [k for k in ("full_eager", "full_graphopt") if k in times]
    full_best = min(times[k] for k in fulls)
    result: dict[str, Any] = {
        "shape": f"{depth}x Linear({d},{d})+GELU, input {(*shape, d)}, r={r}, optimizer {opt_spec}",
        "threads": torch.get_num_threads(),
        "ms_per_step": {k: round(v, 2) for k, v in times.items()},
    }
    for k in fulls:
        result[f"vs_{k}"] = ratios(times, k)
    result["hra_vs_best_full"] = round(times["hra"] / full_best, 3)
    result["peak_mib"] = memory
    for k in fulls:
        result[f"hra_mem_vs_{k}"] = round(memory["hra"] / memory[k], 3)
    # The profiler sees only tensors that aten ops touch: inside inductor's fused kernels the optimizer
    # state (AdamW: 2× the weights) is invisible. The same traced step run op by op (backend="eager")
    # shows every tensor, so memory is also compared there.
    traced = {}
    for name, spec in (("full_graphopt", [opt_spec]), ("hra", [f"hra(r={r})", opt_spec])):
        model = graphopt.compile(base, methods=spec, loss_fn=F.mse_loss, example_inputs=(x,), backend="eager")
        model.step(x, target)
        traced[name] = peak_memory_mib(lambda model=model: model.step(x, target))
    result["peak_mib_traced_eager"] = traced
    result["hra_mem_vs_full_traced_eager"] = round(traced["hra"] / traced["full_graphopt"], 3)
    result["targets_met"] = {"time_le_0.75x_full": times["hra"] <= 0.75 * full_best,
                             "memory_le_full": memory["hra"] <= min(memory[k] for k in fulls),
                             "memory_le_full_traced_eager": traced["hra"] <= traced["full_graphopt"]}
    return result
