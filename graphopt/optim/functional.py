"""Functional building blocks of optimizer rules, traced into the training step: AdamW's step and the
Newton–Schulz orthogonalisation shared by the Muon family (Muon's fixed quintic, per-iteration coefficient
schedules, Turbo-Muon's AOL preconditioning, ROOT's shape-specific coefficients). Optimizers built on them:
``adamw``, ``muon``, ``normuon``, ``adamuon``, ``adago``, ``auon``, ``turbo_muon``, ``root`` (and their AdamW part).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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


Coefficients = tuple[float, float, float]

NS_COEFFICIENTS: Coefficients = (3.4445, -4.7750, 2.0315)
"""Muon's quintic (Jordan et al. 2024), used for every iteration."""

TURBO_SCHEDULE: tuple[Coefficients, ...] = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)
"""The five-iteration coefficient schedule of the Turbo-Muon authors' reference implementation (Boissin et al.
2025); Turbo-Muon runs its last ``ns_steps`` entries after the AOL preconditioning, i.e. it drops the first."""

ROOT_COEFFICIENTS: dict[tuple[int, int], Coefficients] = {
    (2048, 2048): (3.4916, -4.8224, 2.1095),
    (2048, 3072): (3.4509, -4.5790, 1.9325),
    (2048, 8192): (2.9794, -3.6674, 1.6207),
    (2048, 16384): (3.1943, -3.8221, 1.5322),
}
"""ROOT's shape-specific quintic coefficients (He et al. 2025, the authors' release), keyed by
``(min(rows, cols), max(rows, cols))``."""

AOL_EPS = 1e-6


def scale_to_rms(x: torch.Tensor, rms: float) -> torch.Tensor:
    """``x · rms·√(mn)/‖x‖_F`` in place: the RMS alignment of AdaMuon and NorMuon (``rms = 0.2``, Adam's
    typical update RMS), so the update's root-mean-square entry is ``rms`` (a zero ``x`` stays zero)."""
    norm = torch.linalg.matrix_norm(x).clamp_min(torch.finfo(x.dtype).tiny)
    return x.mul_(rms * x.numel() ** 0.5 / norm)


def root_coefficients(rows: int, cols: int) -> Coefficients:
    """ROOT's dimension-robust coefficients for a ``rows × cols`` matrix: the published triple for its shape,
    Muon's :data:`NS_COEFFICIENTS` for a shape the authors published none for (as their code does)."""
    return ROOT_COEFFICIENTS.get((min(rows, cols), max(rows, cols)), NS_COEFFICIENTS)


def coefficient_schedule(coefficients: Coefficients | Sequence[Coefficients], steps: int) -> list[Coefficients]:
    """The ``(a, b, c)`` of each of ``steps`` iterations: one triple repeated, or a sequence of ``steps`` triples."""
    if len(coefficients) == 3 and all(isinstance(v, (int, float)) for v in coefficients):
        return [tuple(coefficients)] * steps
    schedule = [tuple(triple) for triple in coefficients]
    if len(schedule) != steps or any(len(triple) != 3 for triple in schedule):
        raise ValueError(f"a coefficient schedule needs {steps} triples (a, b, c), got {coefficients!r}")
    return schedule


def aol_rescale(x: torch.Tensor, eps: float = AOL_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Turbo-Muon's AOL preconditioning of a wide ``x`` (Boissin et al. 2025; Prach & Lampert 2022, "Almost-
    Orthogonal Layers"): ``A = X Xᵀ``, ``s_i = max(Σ_j |A_ij|, eps)^(−1/2)``; returns ``diag(s) X`` (spectral
    norm ≤ 1) and its Gram matrix ``diag(s) A diag(s)``, which the first iteration reuses."""
    gram = x @ x.t()
    scale = gram.abs().sum(dim=1).clamp_min(eps).rsqrt()
    return x * scale[:, None], gram * scale[:, None] * scale[None, :]


def newton_schulz(update: torch.Tensor, steps: int = 5,
                  coefficients: Coefficients | Sequence[Coefficients] = NS_COEFFICIENTS,
                  aol: bool = False) -> torch.Tensor:
    """Approximately orthogonalise a 2-D ``update`` by the quintic Newton–Schulz iteration (Muon's by default).

    ``X ← N/‖N‖_F`` (a zero matrix stays zero), or, with ``aol``, ``X ← diag(s) N`` (:func:`aol_rescale`);
    transposed when rows > cols so that ``X Xᵀ`` is the small Gram matrix; then for each ``(a, b, c)`` of
    :func:`coefficient_schedule` (``steps`` iterations): ``A = X Xᵀ; X ← aX + (bA + cA²)X``; transposed back.
    """
    schedule = coefficient_schedule(coefficients, steps)
    x = update
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.t()
    gram = None
    if aol:
        x, gram = aol_rescale(x)
    else:
        norm = torch.linalg.matrix_norm(x)  # Frobenius
        x = x / norm.clamp_min(torch.finfo(x.dtype).tiny)
    for a, b, c in schedule:  # addmm keeps at most three matrix-sized temporaries alive
        if gram is None:
            gram = x @ x.t()
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        gram = None
    return x.t() if tall else x
