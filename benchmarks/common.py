"""Shared pieces of graphopt's benchmark cases: the adapter bench model and an eager training step."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def linear_gelu_stack(width: int = 1024, blocks: int = 4) -> nn.Sequential:
    """The adapter bench model: ``blocks`` × (``Linear(width, width)`` + GELU)."""
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers)


def eager_training_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor,
                        loss_fn: Callable[..., torch.Tensor] = F.mse_loss) -> Callable[[], torch.Tensor]:
    """One plain eager PyTorch training step (zero_grad, loss, backward, ``optimizer.step``) as a closure."""

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), target)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step

