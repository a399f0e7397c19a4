"""Functional building blocks of optimizer rules, traced into the training step: AdamW's step and
Muon's Newton–Schulz orthogonalisation. Optimizers built on them: ``adamw``, ``muon`` (and its AdamW part).
"""

from __future__ import annotations

import math

import torch


@torch.library.custom_op("graphopt::adam_coefficients", mutates_args=())
def adam_coefficients(lr: torch.Tensor, step: torch.Tensor, beta1: float, beta2: float,
                      weight_decay: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-step scalars of AdamW in float64: ``1 − lr·λ``, ``lr/(1 − β1ᵗ)`` and ``√(1 − β2ᵗ)``.

    An opaque op on purpose: inductor would otherwise inline these 0-d computations (two ``pow`` in
    double) into the elementwise update loop and recompute them for every vector of every parameter
    (measured: the fused AdamW kernels took ~5× longer).
    """
    t, rate = float(step), float(lr)  # Python floats (double), as torch.optim's single-tensor AdamW
    values = (1 - rate * weight_decay, rate / (1 - beta1**t), math.sqrt(1 - beta2**t))
    return tuple(torch.tensor(v, dtype=torch.float64) for v in values)


@adam_coefficients.register_fake
def _adam_coefficients_fake(lr, step, beta1, beta2, weight_decay):
    return tuple(torch.empty((), dtype=torch.float64) for _ in range(3))


def adam_step(param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], lr: torch.Tensor,
              betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """One AdamW step in place (Loshchilov & Hutter 2019, torch.optim.AdamW), shared by ``adamw`` and ``muon``.

    ``t ← t + 1``; ``p ← p·(1 − lr·λ)``; ``m ← β1·m + (1−β1)·g``; ``v ← β2·v + (1−β2)·g²``;
    ``p ← p − (lr/(1−β1ᵗ))·m / (√v/√(1−β2ᵗ) + ε)``. ``lr`` and the step count ``state["step"]`` are
    0-d float64 tensors; the bias corrections are computed in float64 as torch.optim does.
    """
    beta1, beta2 = betas
    step = state["step"]
    step.add_(1)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    decay, step_size, bias_correction2_sqrt = adam_coefficients(lr, step, beta1, beta2, float(weight_decay))
    if weight_decay:
        param.mul_(decay.to(param.dtype))
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    # one temporary of the parameter's size: denom, then (step_size·m/denom) in its storage
    denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt.to(param.dtype)).add_(eps)
    param.sub_(denom.reciprocal_().mul_(exp_avg).mul_(step_size.to(param.dtype)))


def adam_state(param: torch.Tensor) -> dict[str, torch.Tensor]:
    """Zero AdamW state of ``param``: its own step count (float64) and the two moments."""
    return {"step": torch.zeros((), dtype=torch.float64), "exp_avg": torch.zeros_like(param),
            "exp_avg_sq": torch.zeros_like(param)}


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(update: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately orthogonalise a 2-D ``update`` (the quintic Newton–Schulz iteration of Muon).

    ``X ← N/‖N‖_F`` (a zero matrix stays zero), transposed when rows > cols so that ``X Xᵀ`` is the
    small Gram matrix; ``steps``× ``A = X Xᵀ; X ← aX + (bA + cA²)X``; transposed back.
    """
    a, b, c = NS_COEFFICIENTS
    x = update
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.t()
    norm = torch.linalg.matrix_norm(x)  # Frobenius
    x = x / norm.clamp_min(torch.finfo(x.dtype).tiny)
    for _ in range(steps):  # addmm keeps at most three matrix-sized temporaries alive
        gram = x @ x.t()
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.t() if tall else x
