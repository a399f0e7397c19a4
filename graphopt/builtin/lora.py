"""``lora``: Low-Rank Adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv:2106.09685), with the options and numerics of PEFT's ``LoraConfig``.

Each targeted linear layer ``y = x Wᵀ + b`` (``W ∈ R^{out×in}``, frozen; transformers ``Conv1D`` too) gets a
low-rank branch on its input::

    y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ,     s = alpha / r     (use_rslora: s = alpha / √r, Kalajdzievski 2023)

``A ∈ R^{r×in}`` (``<path>.lora_A``, Kaiming-uniform with ``a = √5``, i.e. U(−1/√in, 1/√in), PEFT's default)
and ``B ∈ R^{out×r}`` (``<path>.lora_B``, zeros: the model starts unchanged). ``drop`` is dropout with
probability ``dropout`` on the branch input only, in training only (PEFT's ``lora_dropout``): an
``aten.dropout(x, p, train=True)`` node that the inference graph turns off with the model's own dropouts.
Export with ``merge=True`` folds ``W ← W + s·B A``; ``merge=False`` keeps the branch (no dropout).

The pieces SoRA shares (the factors' init, the branch and its fold) live here; ``graphopt.builtin.sora``
imports them.
"""

from __future__ import annotations

import math

import torch

import graphopt
from graphopt.rewrite.adapters import fold_output_deltas, insert_output_delta, weight_groups
from graphopt.rewrite.layers import LayerCall, check_rank


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The branch ``s·(x Aᵀ) Bᵀ`` (the scale applied on the rank-r side: cheaper)."""
    return ((x @ A.t()) * scale) @ B.t()


def lora_fold_delta(A: torch.Tensor, B: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The branch as a weight delta ``s·B A`` in ``(out, in)`` layout."""
    return (B * scale) @ A


def lora_factors(layer: LayerCall, r: int, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's init for a rank-``r`` branch on ``layer``: ``A (r, in)`` Kaiming-uniform (``a = √5``), ``B (out, r)``
    zeros, in the dtype and device of the layer's ``weight``."""
    factory = {"dtype": weight.dtype, "device": weight.device}
    a = torch.empty(r, layer.in_features, **factory)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return a, torch.zeros(layer.out_features, r, **factory)


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """``alpha/r``, or ``alpha/√r`` with rank-stabilised scaling (PEFT's ``use_rslora``)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRA(graphopt.Method):
    """LoRA (Hu et al. 2021) as PEFT computes it: ``y = base(x) + s·(drop(x) Aᵀ) Bᵀ``, ``s = alpha/r``.

    Options (PEFT's names in brackets): ``r`` (``r``), ``alpha`` (``lora_alpha``), ``dropout``
    (``lora_dropout``), ``targets`` (``target_modules``: globs over module paths; every linear layer when
    None), ``use_rslora`` (``use_rslora``: ``s = alpha/√r``).
    """

    name = "lora"
    stage = "forward"

    def __init__(self, r: int = 8, alpha: float = 8, dropout: float = 0.0,
                 targets: str | list[str] | tuple[str, ...] | None = None, use_rslora: bool = False) -> None:
        self.r, self.alpha, self.dropout, self.targets, self.use_rslora = r, alpha, dropout, targets, use_rslora
        self.check(isinstance(r, int) and r >= 1, "r", "use an integer r >= 1")
        self.check(math.isfinite(alpha) and alpha > 0, "alpha", "use a finite alpha > 0 (the branch is scaled by "
                   "alpha/r, or alpha/sqrt(r) with use_rslora)")
        self.check(0.0 <= dropout < 1.0, "dropout", "use 0 <= dropout < 1 (the probability of zeroing a branch input)")

    def apply(self, gm: torch.fx.GraphModule, ctx: graphopt.MethodContext) -> None:
        """A branch on every targeted layer; the fold to ``ctx``."""
        layers = ctx.select(self.targets)
        check_rank(self.name, self.r, layers)
        paths = list(dict.fromkeys(layer.path for layer in layers))
        scale = lora_scale(self.r, self.alpha, self.use_rslora)
        for calls in weight_groups(ctx, layers):  # a shared weight: one branch, added at every call, folded once
            a, b = lora_factors(calls[0], self.r, ctx.parameter(calls[0].weight.target))
            names = [ctx.add_parameter(calls[0].path, "A", a), ctx.add_parameter(calls[0].path, "B", b)]
            for call in calls:
                insert_output_delta(ctx, call, lora_delta, names, dropout=self.dropout, scale=scale)
        ctx.add_export_pass(lambda export_gm: fold_output_deltas(export_gm, lora_delta, lora_fold_delta), merge=True)
        ctx.add_description(f"lora: r={self.r}, scale={scale:g} on {len(layers)} layer(s): {', '.join(paths)}")


@graphopt.hookimpl
def graphopt_register_methods(register):
    register(LoRA)
