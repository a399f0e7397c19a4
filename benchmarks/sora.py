"""``graphopt bench`` case "sora": per-step time of SoRA against a plain LoRA of the same rank, and the
inference time of a pruned SoRA export against an r-rank LoRA export.

Model: 4 blocks of Linear(1024, 1024) + GELU, input (32, 64, 1024) (quick: (8, 64, 1024)), MSE loss to a
fixed random target, adapters on every linear layer. Variants, measured side by side:

- ``lora_eager``: a plain LoRA written here in PyTorch (``y = W x + b + s·B A x``), ``torch.optim`` step;
  no graphopt involved.
- ``lora_graphopt``: the same LoRA as graphopt's built-in ``lora`` method, so the only difference to
  ``sora`` is the gate and its proximal step.
- ``sora``: ``sora(r=8, sparse_lambda=1e-3)``.

The optimizer is AdamW (``adamw`` / ``torch.optim.AdamW``) when the ``adamw`` method is registered,
else SGD. Inference: a SoRA model whose gates are half zero (set by hand), pruned to r′ = r/2 and
exported with ``merge=False``, against the r-rank LoRA exported with ``merge=False`` and the merged
(plain) model, all timed in onnxruntime.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.bench import peak_memory_mib, ratios, time_steps

from .common import eager_training_step, linear_gelu_stack


class EagerLoRALinear(nn.Module):
    """The graphopt-free baseline: a frozen linear layer plus ``s·(x Aᵀ) Bᵀ``."""

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.A = nn.Parameter(torch.empty(r, base.in_features))
        nn.init.kaiming_uniform_(self.A, a=5**0.5)
        self.B = nn.Parameter(torch.zeros(base.out_features, r))
        self.scale = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + ((x @ self.A.t()) * self.scale) @ self.B.t()


def _onnx_timer(path: Path, x: torch.Tensor):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def bench_sora(quick: bool) -> dict[str, Any]:
    r, alpha, lr = 8, 16, 1e-3
    torch.manual_seed(0)
    base = linear_gelu_stack()
    shape = (8, 64, 1024) if quick else (32, 64, 1024)
    x, target = torch.randn(shape), torch.randn(shape)
    steps = 10 if quick else 20  # quick: smaller input, fewer steps, no peak memory, no merged export
    use_adamw = "adamw" in graphopt.list_methods()
    opt_spec = f"adamw(lr={lr})" if use_adamw else f"sgd(lr={lr})"

    # plain LoRA in eager PyTorch
    eager = copy.deepcopy(base)
    for i in range(0, len(eager), 2):
        eager[i] = EagerLoRALinear(eager[i], r, alpha)
    params = [p for p in eager.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr) if use_adamw else torch.optim.SGD(params, lr=lr)
    eager_step = eager_training_step(eager, optimizer, x, target)

    lora = graphopt.compile(base, methods=[f"lora(r={r}, alpha={alpha})", opt_spec], loss_fn=F.mse_loss,
                            example_inputs=(x,))
    sora = graphopt.compile(base, methods=[f"sora(r={r}, alpha={alpha}, sparse_lambda=1e-3)", opt_spec],
                            loss_fn=F.mse_loss, example_inputs=(x,))
    variants = {"lora_eager": eager_step, "lora_graphopt": lambda: lora.step(x, target),
                "sora": lambda: sora.step(x, target)}
    times = time_steps(variants, steps=steps, warmup=3, block=5, progress=False)
    memory = {name: peak_memory_mib(fn) for name, fn in variants.items()} if not quick else {}

    # inference after pruning: half of each layer's gates set to zero, then pruned to r' = r/2
    with torch.no_grad():
        for name, p in sora.named_parameters():
            if name.endswith("sora_gate"):
                p[: r // 2] = 0
            elif name.endswith("sora_B"):
                p.normal_(0, 1e-3)
    sora.prune()
    pruned_ranks = sorted({a for a, _ in sora.sora_ranks().values()})
    xi = x[:8] if quick else x
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"sora_pruned": Path(tmp) / "sora_pruned.onnx", "lora_r": Path(tmp) / "lora.onnx"}
        graphopt.export(sora.eval(), paths["sora_pruned"], example_inputs=(xi,), merge=False)
        graphopt.export(lora.eval(), paths["lora_r"], example_inputs=(xi,), merge=False)
        if not quick:  # the merged plain model, for reference
            paths["merged"] = Path(tmp) / "merged.onnx"
            graphopt.export(lora.eval(), paths["merged"], example_inputs=(xi,), merge=True)
        timers = {name: _onnx_timer(path, xi) for name, path in paths.items()}
        inference = time_steps(timers, steps=steps, warmup=2, block=5, progress=False)

    return {
        "optimizer": opt_spec.split("(")[0],
        "input": list(shape),
        "r": r,
        "step_ms": {k: round(v, 2) for k, v in times.items()},
        "ratio_vs_lora_graphopt": ratios(times, "lora_graphopt"),
        "ratio_vs_lora_eager": ratios(times, "lora_eager"),
        "peak_mib": memory,
        "pruned_rank": pruned_ranks,
        "onnx_inference_ms": {k: round(v, 2) for k, v in inference.items()},
        "onnx_ratio_vs_lora_r": ratios(inference, "lora_r"),
    }
