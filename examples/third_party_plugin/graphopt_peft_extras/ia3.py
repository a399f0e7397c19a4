"""``ia3``: learned rescaling of each targeted linear layer's input features (an input transform).

IA³ (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning") trains vectors that rescale activations. Here, for a linear layer ``y = x Wᵀ + b``, the input
is scaled by ``l ∈ R^in`` (ones at init, so the model starts unchanged)::

    y = (x ⊙ l) Wᵀ + b = x (W diag(l))ᵀ + b        folded at export: W′ = W diag(l)
"""

from __future__ import annotations

import torch

import graphopt
from graphopt.rewrite.adapters import fold_input_transforms, insert_input_transform


def ia3_scale_input(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x ⊙ l`` over the last (feature) dimension."""
    return x * scale


def ia3_fold_weight(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``W diag(l)`` for ``W (out, in)``."""
    return weight * scale


class IA3(graphopt.Method):
    """IA³-style input scaling of linear layers (Liu et al. 2022): ``y = (x ⊙ l) Wᵀ + b``; folds into W."""

    name = "ia3"
    stage = "forward"

    def __init__(self, targets: str | list[str] | None = None) -> None:
        self.targets = targets

    def apply(self, gm: torch.fx.GraphModule, ctx: graphopt.MethodContext) -> None:
        for layer in ctx.select(self.targets):  # globs over module paths; no match: an error listing layers
            scale = ctx.add_parameter(layer.path, "scale", torch.ones(layer.in_features))
            insert_input_transform(ctx, layer, ia3_scale_input, [scale])
        ctx.add_export_pass(lambda export_gm: fold_input_transforms(export_gm, ia3_scale_input, ia3_fold_weight),
                            merge=True)
