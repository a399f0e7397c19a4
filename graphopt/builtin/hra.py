"""``hra``: Householder Reflection Adaptation (Yuan et al. 2024, "Bridging the Gap between Low-rank and
Orthogonal Adaptation via Householder Reflection Adaptation", arXiv:2405.17484).

Each targeted linear layer ``y = x Wᵀ + b`` (``W ∈ R^{out×in}``) gets a trainable ``hra_u ∈ R^{in×r}``.
With ``û_i = u_i/‖u_i‖`` and ``H_i = I − 2 û_i û_iᵀ`` the effective weight is ``W′ = W R``,
``R = H_1 H_2 ⋯ H_r``, so ``y = (x Rᵀ) Wᵀ + b``: graphopt transforms the layer *input*.

The product is never formed as a d×d matrix. It is used in compact WY form (Schreiber & Van Loan 1989,
"A storage-efficient WY representation for products of Householder transformations")::

    R = H_1 ⋯ H_r = I − Û T Ûᵀ,   T⁻¹ = ½ I + striu(ÛᵀÛ)   (T r×r upper triangular)

(the identity ``T⁻¹ + T⁻ᵀ = ÛᵀÛ`` of Joffrain et al. 2006 for unit vectors). ``T⁻¹ = ½(I + N)`` with
``N = 2·striu(ÛᵀÛ)`` strictly upper triangular, so ``N^r = 0`` and ``(I + N)⁻¹ = Σ_{k<r} (−N)^k`` exactly,
evaluated as ``∏_k (I + (−N)^{2^k})`` in ⌈log₂ r⌉ r×r products (no solve, so it exports to ONNX).
With ``Z = Û T``: ``x Rᵀ = x − (x Û) Zᵀ``, two skinny matmuls of cost ``N·in·r`` each; the backward keeps
only the layer input and the r-wide ``x Û``. ``Vᵀ = Ûᵀ`` and ``Zᵀ`` are kept as row-major ``(r, in)``
matrices, the layout in which MKL's skinny GEMMs (forward and autograd's backward) are fast; see
docs/methods/hra.md for the measurements. That is the form of the forward graph (inference, export); the
training step fuses each input transform with the linear layer it feeds (:func:`hra_linear`,
:mod:`graphopt.builtin.reflected_linear`: the same values and gradients, without writing ``x Rᵀ`` or the
activation-sized passes of its backward).

Conv2d layers (``W (out, C/g, kh, kw)``, any stride, padding, dilation, groups) are adapted as the matrix
``W (out, C/g·kh·kw)`` over each filter's patch, ``W′ = W R``, one ``R`` shared by the groups: the same
formula. There the input-centric form would rotate the unfolded patches (kh·kw times the input's memory);
forming ``W′ = W − (W Z) Vᵀ`` in the step and running the conv on it measured several times faster, so
conv layers are adapted weight-centric (docs/methods/hra.md, "Conv2d").

``apply_gs=True``: Gram–Schmidt the columns of ``hra_u`` to an orthonormal ``Q`` and use ``R = I − 2QQᵀ``
(the same WY form with ``Û = Q``, ``T = 2I``). ``reg_lambda > 0`` adds ``reg_lambda·‖I − ÛᵀÛ‖_F``
(summed over layers) to the training loss.

Init: columns in equal adjacent pairs ``u_{2i} = u_{2i+1}`` with a Kaiming-uniform random direction per
pair, so ``H_{2i} H_{2i+1} = I`` and ``R = I`` exactly at init (hence even ``r``). With ``apply_gs`` the
columns are independent (a pair would Gram–Schmidt to a zero vector), and ``R = I − 2QQᵀ`` is never
the identity: the model starts changed. At export with ``merge=True`` the adapter is folded: ``W ← W R``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import torch

import graphopt
from graphopt.builtin.reflected_linear import reflected_linear
from graphopt.errors import OptionError
from graphopt.rewrite.adapters import (
    fold_input_transforms,
    fold_weight_transforms,
    insert_input_transform,
    insert_weight_transform,
    weight_groups,
)


# -- the math ---------------------------------------------------------------------------------------
def gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """Orthonormalise the columns of ``u (in, r)`` in order (modified Gram–Schmidt)."""
    columns: list[torch.Tensor] = []
    for i in range(u.shape[1]):
        v = u[:, i]
        for q in columns:
            v = v - (q @ v) * q
        columns.append(v / torch.linalg.vector_norm(v))
    return torch.stack(columns, dim=1)


def hra_wy(u: torch.Tensor, apply_gs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Vᵀ, Zᵀ)``, both ``(r, in)`` row-major, with ``H_1 ⋯ H_r = I − Z Vᵀ`` (compact WY form).

    Plain HRA: ``V = Û`` (unit columns), ``Z = Û T`` with ``T = 2(I + 2·striu(ÛᵀÛ))⁻¹`` computed exactly by
    the finite Neumann product. ``apply_gs``: ``V = Q = GS(u)``, ``Z = 2Q``. The factors are returned
    transposed and contiguous because the skinny GEMMs of the transform (and of its backward, which
    autograd lays out after its inputs) are several times faster with the r-sized operand in this layout.
    """
    if apply_gs:
        qt = gram_schmidt(u).t().contiguous()
        return qt, 2 * qt
    r = u.shape[1]
    vt = (u / torch.linalg.vector_norm(u, dim=0, keepdim=True)).t().contiguous()
    # r×r×in products as broadcast-and-sum, not GEMMs: tiny, and the compiler fuses them (with their
    # backward) into a few loops instead of one multithreaded BLAS call each
    minus_n = -2 * torch.triu((vt.unsqueeze(1) * vt.unsqueeze(0)).sum(-1), diagonal=1)
    eye = torch.eye(r, dtype=u.dtype, device=u.device)
    inverse = eye + minus_n                     # Σ_{k<2} (−N)^k
    power = minus_n
    for _ in range(1, max(1, math.ceil(math.log2(r)))):
        power = power @ power                   # (−N)^{2^k}
        inverse = inverse @ (eye + power)       # now Σ_{k<2^{k+1}} (−N)^k = (I + N)⁻¹ once 2^{k+1} ≥ r
    zt = ((2 * inverse.t()).unsqueeze(-1) * vt.unsqueeze(0)).sum(1)  # Zᵀ = Tᵀ Vᵀ
    return vt, zt


def hra_transform(x: torch.Tensor, u: torch.Tensor, apply_gs: bool = False) -> torch.Tensor:
    """``x Rᵀ`` over the last dim of ``x``, ``R = H_1 ⋯ H_r``: ``x − (x V) Zᵀ`` (two skinny matmuls).

    ``R`` is computed in the dtype of ``u`` and applied in the dtype of ``x``.
    """
    vt, zt = hra_wy(u, apply_gs)
    if vt.dtype != x.dtype:
        vt, zt = vt.to(x.dtype), zt.to(x.dtype)
    # one GEMM with the residual as its bias: the backward needs no negation or copy of x-sized tensors
    rows = x.reshape(-1, x.shape[-1])
    return torch.addmm(rows, rows @ vt.t(), -zt).reshape(x.shape)


def hra_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, u: torch.Tensor,
               apply_gs: bool = False) -> torch.Tensor:
    """``F.linear(hra_transform(x, u), weight, bias)`` as one autograd function (the training form,
    :mod:`graphopt.builtin.reflected_linear`): the same values and gradients without writing ``x Rᵀ``."""
    return reflected_linear(x, weight, bias, *hra_wy(u, apply_gs))


def fuse_linear_layers(gm: torch.fx.GraphModule) -> None:
    """The training pass: every ``aten.linear(hra_transform(x, u), W, b)`` becomes ``hra_linear(x, W, b, u)``;
    the transform node goes once no other node reads it."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not hra_transform:
            continue
        for user in list(node.users):
            if user.target is not torch.ops.aten.linear.default or user.args[0] is not node:
                continue
            bias = user.args[2] if len(user.args) > 2 else user.kwargs.get("bias")
            with gm.graph.inserting_before(user):
                fused = gm.graph.call_function(hra_linear, (node.args[0], user.args[1], bias, *node.args[1:]),
                                               dict(node.kwargs))
            fused.meta.update(user.meta)
            user.replace_all_uses_with(fused)
            gm.graph.erase_node(user)
        if not node.users:
            gm.graph.erase_node(node)


def hra_matrix(u: torch.Tensor, apply_gs: bool = False) -> torch.Tensor:
    """The dense ``R = I − Z Vᵀ`` (in × in): for folding and inspection, never used in training."""
    vt, zt = hra_wy(u, apply_gs)
    return torch.eye(u.shape[0], dtype=u.dtype, device=u.device) - zt.t() @ vt


def hra_conv_weight(weight: torch.Tensor, u: torch.Tensor, apply_gs: bool = False) -> torch.Tensor:
    """``W R = W − (W Z) Vᵀ`` with ``W`` viewed as ``(out, in)`` (a conv weight ``(out, C/g, kh, kw)`` as
    ``(out, C/g·kh·kw)``), in the weight's shape and dtype: the conv layers' form in training."""
    vt, zt = hra_wy(u, apply_gs)
    w = weight.reshape(weight.shape[0], -1)
    return (w - (w @ zt.t().to(w.dtype)) @ vt.to(w.dtype)).reshape(weight.shape)


def hra_fold_weight(weight: torch.Tensor, u: torch.Tensor, apply_gs: bool = False) -> torch.Tensor:
    """``W R`` for ``W (out, in)`` or a conv weight, computed in float64 and returned in ``W``'s dtype."""
    return hra_conv_weight(weight.double(), u.double(), apply_gs).to(weight.dtype)


def orthogonality_penalty(u: torch.Tensor) -> torch.Tensor:
    """``‖I − ÛᵀÛ‖_F`` with ``Û`` the column-normalised ``u`` (the paper's regulariser)."""
    v = u / torch.linalg.vector_norm(u, dim=0, keepdim=True)
    eye = torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
    return torch.linalg.matrix_norm(eye - v.t() @ v)


def paired_init(in_features: int, r: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                paired: bool = True) -> torch.Tensor:
    """``(in, r)`` init: ``r/2`` Kaiming-uniform directions (``a = √5``, fan-in ``r/2``), each repeated twice.

    ``paired=False`` draws ``r`` independent columns (for ``apply_gs``).
    """
    count = r // 2 if paired else r
    bound = math.sqrt(6.0 / ((1 + 5) * count))  # kaiming-uniform with a = sqrt(5): 1/sqrt(fan_in)
    base = torch.empty(in_features, count, dtype=dtype, device=device).uniform_(-bound, bound)
    return base.repeat_interleave(2, dim=1) if paired else base


# -- the method ---------------------------------------------------------------------------------------
class HRA(graphopt.Method):
    """Householder Reflection Adaptation: ``W′ = W H_1⋯H_r`` applied input-centric in compact WY form."""

    name = "hra"
    stage = "forward"

    def __init__(self, r: int = 8, targets: str | list[str] | None = None, apply_gs: bool = False,
                 reg_lambda: float = 0.0) -> None:
        self.r, self.targets, self.apply_gs, self.reg_lambda = r, targets, apply_gs, reg_lambda
        self.check(r >= 2 and r % 2 == 0, "r",
                   f"r must be an even number >= 2 (the init pairs equal columns so that R = I); "
                   f"use r={max(2, r + 1 if r % 2 else r)}")
        self.check(reg_lambda >= 0 and math.isfinite(reg_lambda), "reg_lambda", "use a finite reg_lambda >= 0")

    def apply(self, gm: torch.fx.GraphModule, ctx: graphopt.MethodContext) -> None:
        """Insert ``hra_transform(x, u)`` before every targeted linear layer (``hra_conv_weight(W, u)`` for a
        Conv2d); the penalty and the folds go to ``ctx``. Default targets: linear layers only."""
        kinds = ("linear", "addmm") if self.targets is None else ("linear", "addmm", "conv2d", "conv1d")
        layers = ctx.select(self.targets, kinds, what="linear or conv2d")
        for layer in layers:
            if self.r > layer.in_features:
                raise OptionError(f"method 'hra': option r={self.r} is larger than in_features="
                                  f"{layer.in_features} of layer {layer.path!r}; use r <= {layer.in_features} "
                                  "or exclude the layer from targets")
        names = []
        for calls in weight_groups(ctx, layers):  # a shared weight: one adapter, applied at every call
            layer = calls[0]
            base = ctx.parameter(layer.weight.target)
            init = paired_init(layer.in_features, self.r, base.dtype, base.device, paired=not self.apply_gs)
            names.append(ctx.add_parameter(layer.path, "u", init))
            for call in calls:
                if call.kind in ("conv2d", "conv1d"):
                    insert_weight_transform(ctx, call, hra_conv_weight, [names[-1]], apply_gs=self.apply_gs)
                else:
                    insert_input_transform(ctx, call, hra_transform, [names[-1]], apply_gs=self.apply_gs)
        if self.reg_lambda:
            ctx.add_loss_term(functools.partial(_penalty, names, self.reg_lambda))
        ctx.add_training_pass(fuse_linear_layers)
        ctx.add_export_pass(_fold, merge=True)
        ctx.add_description(f"hra: r={self.r} on {len(names)} weight(s): "
                            f"{', '.join(dict.fromkeys(layer.path for layer in layers))}")


def _fold(gm: torch.fx.GraphModule) -> None:
    """Export with ``merge=True``: ``W ← W R`` for every adapted layer (linear and conv)."""
    fold_input_transforms(gm, hra_transform, hra_fold_weight)
    fold_weight_transforms(gm, hra_conv_weight, hra_fold_weight)


def _penalty(names: list[str], reg_lambda: float, params: Mapping[str, torch.Tensor],
             hyper: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """``reg_lambda · Σ_layers ‖I − ÛᵀÛ‖_F`` over the adapters trained in this step."""
    terms = [orthogonality_penalty(params[n]) for n in names if n in params]
    return reg_lambda * torch.stack(terms).sum() if terms else None


@graphopt.hookimpl
def graphopt_register_methods(register):
    register(HRA)

