"""Shared pieces of graphopt's benchmark cases: the adapter bench model and an eager training step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def many_compiled_peft_models() -> Any:
    """A decorator for a case that compiles many PEFT models in one process: every ``torch.compile``'d PEFT
    model recompiles ``PeftModel.forward`` (its guards hold the instance), and past dynamo's default limit of 8
    per code object the next models would silently run eager. The limit is raised, and reaching it fails."""
    return torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True)


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

