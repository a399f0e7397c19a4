"""A linear layer that reads its input through HRA's reflections, as one autograd function: HRA's training form.

With ``R = I − Z Vᵀ`` (``V, Z`` of shape ``(in, r)``, passed as ``Vᵀ, Zᵀ``; :func:`graphopt.builtin.hra.hra_wy`)
and a frozen ``W (out, in)``, the layer computes ``y = (x Rᵀ) Wᵀ + b``. Written as the input transform
``x' = x − (x V) Zᵀ`` followed by the layer, the step writes ``x'``, reads it back for the layer's GEMM, and
in the backward forms ``dx' = dY W``, reads it three times and writes ``dx = dx' − (dx' Z) Vᵀ``: four
activation-sized passes around each GEMM, which on a CPU cost as much as a tenth of the step. Here the
forward folds the reflections into the weight (``W' = W − (W Z) Vᵀ``, ``2·out·in·r`` multiply-adds) and
runs one GEMM; with ``s = x V`` and ``P = W Z`` the backward is

    dx  = dY W'
    dVᵀ = −(dY P)ᵀ x
    dZᵀ = −(sᵀ dY) W

and, only when they train, ``dW = dYᵀ (x − s Zᵀ)`` and ``db = Σ dY``: the same values and gradients as the
input transform (Yuan et al. 2024, "Bridging The Gap between Low-rank and Orthogonal Adaptation via
Householder Reflection Adaptation"), with no ``(out, in)`` weight gradient and no ``x'``.

Under autocast the products run in the autocast dtype (as ``F.linear`` would) and every gradient is returned in
its input's dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class ReflectedLinear(torch.autograd.Function):
    """``y = x (W − (W Z) Vᵀ)ᵀ + b`` with the backward of the module docstring."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, vt: torch.Tensor,
                zt: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        ctx.shape, ctx.dtypes = x.shape, (x.dtype, weight.dtype, None if bias is None else bias.dtype, vt.dtype)
        with torch.autocast(device, enabled=False):
            wz = weight @ zt.t().to(weight.dtype)                                       # P = W Z
            folded = torch.addmm(weight, wz, vt.to(weight.dtype), alpha=-1).to(dtype)  # W' = W − P Vᵀ
            x = x.to(dtype)
            rows = x.reshape(-1, x.shape[-1])
            s = rows @ vt.t().to(dtype)
            # on x itself, not on rows: the output must not be a view (models write into it in place: Falcon)
            y = F.linear(x, folded, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(rows, weight, folded, wz, s, zt)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, weight, folded, wz, s, zt = ctx.saved_tensors
        x_dtype, weight_dtype, bias_dtype, factor_dtype = ctx.dtypes
        dtype = folded.dtype
        with torch.autocast(dy.device.type, enabled=False):
            g = dy.reshape(-1, dy.shape[-1]).to(dtype)
            dx = (g @ folded).reshape(ctx.shape).to(x_dtype) if ctx.needs_input_grad[0] else None
            d_vt = -((g @ wz.to(dtype)).t() @ rows)
            d_zt = -((s.t() @ g) @ weight.to(dtype))
            d_weight = d_bias = None
            if ctx.needs_input_grad[1]:
                d_weight = (g.t() @ (rows - s @ zt.to(dtype))).to(weight_dtype)
            if bias_dtype is not None and ctx.needs_input_grad[2]:
                d_bias = g.sum(0).to(bias_dtype)
        return dx, d_weight, d_bias, d_vt.to(factor_dtype), d_zt.to(factor_dtype)


def reflected_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, vt: torch.Tensor,
                     zt: torch.Tensor) -> torch.Tensor:
    """``F.linear(x − (x Vᵀᵀ) Zᵀ, W, b)`` through :class:`ReflectedLinear`."""
    return ReflectedLinear.apply(x, weight, bias, vt, zt)
