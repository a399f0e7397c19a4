"""``sgd``: stochastic gradient descent fused into the training graph, equal to ``torch.optim.SGD``.

Robbins & Monro 1951; momentum as in torch.optim.SGD (Sutskever et al. 2013 for the Nesterov form),
dampening 0. With lr η, weight decay λ (L2, added to the gradient), momentum μ::

    g ← g + λp
    B ← μB + g              (B₀ = 0, so B = g on the first step, as torch does)
    d = g + μB (nesterov)   or   d = B   (or d = g without momentum)
    p ← p − η·d

The update runs inside the captured training step right after the parameter's gradient exists (see
``graphopt.train.schedule``). State per parameter: ``momentum_buffer`` (only with momentum > 0).
Shared options ``groups`` and ``max_grad_norm`` come from ``graphopt.optim.Optimizer``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

import graphopt


class SGD(graphopt.optim.Optimizer):
    """SGD with momentum, Nesterov momentum and L2 weight decay (torch.optim.SGD semantics)."""

    name = "sgd"
    elementwise = True  # sharded training updates each rank's rows as they are
    example: ClassVar[Mapping[str, float]] = {"lr": 0.1}

    def __init__(self, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0) -> None:
        self.lr, self.momentum, self.nesterov, self.weight_decay = lr, momentum, nesterov, weight_decay
        self.check(lr >= 0, "lr", "use lr >= 0")
        self.check(0 <= momentum < 1, "momentum", "use 0 <= momentum < 1")
        self.check(weight_decay >= 0, "weight_decay", "use weight_decay >= 0")
        self.check(not nesterov or momentum > 0, "nesterov", "nesterov=True needs momentum > 0")

    def init_state(self, name: str, param: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"momentum_buffer": torch.zeros_like(param)} if self.momentum else {}

    def update(self, name: str, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
               hyper: Mapping[str, torch.Tensor]) -> None:
        if self.weight_decay:
            grad = grad + self.weight_decay * param
        if self.momentum:
            buffer = state["momentum_buffer"]
            buffer.mul_(self.momentum).add_(grad)
            grad = grad + self.momentum * buffer if self.nesterov else buffer
        param.sub_(hyper["lr"].to(param.dtype) * grad)


@graphopt.hookimpl
def graphopt_register_methods(register):
    register(SGD)

