"""``oftv2``: orthogonal finetuning with block-diagonal Cayley–Neumann rotations of the layer input.

Qiu, Liu, Weller, Schölkopf 2025, *Orthogonal Finetuning Made Scalable* (OFTv2, arXiv:2506.19847).

A linear layer ``y = x Wᵀ + b`` (``W ∈ R^{out×in}``) is finetuned as ``y = x R_bd Wᵀ + b``, i.e. with the
effective weight ``W′ = W R_bdᵀ``, where ``R_bd = blockdiag(R_1, …, R_{in/b})`` is orthogonal:

- the trainable parameter ``<path>.oftv2_q`` has shape ``(in/b, b(b−1)/2)``: row ``j`` holds the strict
  upper triangle ``M_j`` of block ``j`` in ``torch.triu_indices(b, b, 1)`` order (zeros at init, so
  ``R = I`` and the model starts exactly as it was); ``Q_j = M_j − M_jᵀ`` is skew-symmetric;
- ``R_j = (I + Q_j)(I − Q_j)⁻¹`` (Cayley transform, orthogonal for every skew ``Q_j``), approximated by
  the truncated Neumann series ``(I − Q_j)⁻¹ ≈ Σ_{i=0}^{K−1} Q_j^i``, ``K = neumann_terms``; ``K = 0`` is
  the exact Cayley transform computed by a linear solve.

Input-centric forward (the OFTv2 idea): split the last dim of ``x`` into blocks ``x_j`` of size ``b``,
rotate each block ``x_j ← x_j R_j`` (one batched matmul over blocks), then run the frozen base layer.
``W′`` is never formed in training; export with ``merge=True`` folds ``W ← W R_bdᵀ``.

Conv2d layers (``W (out, C/g, kh, kw)``, any stride, padding, dilation, groups): ``R_bd`` rotates each
unfolded input patch of ``C·kh·kw`` values (channel-major, as ``F.unfold`` and PEFT lay it out), in blocks
that lie inside one group (``b`` divides ``C/g·kh·kw``); so ``q`` has ``C·kh·kw/b`` rows, PEFT's layout, and
filter ``o`` of group ``g`` becomes ``W′_o = W_o R_gᵀ`` (``R_g`` the group's diagonal part). Rotating the
unfolded patches measured several times slower than forming ``W′`` in the step, so conv layers are
adapted weight-centric (``oftv2_conv_weight``; docs/methods/oftv2.md, "Conv2d").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import graphopt
from graphopt.errors import OptionError
from graphopt.rewrite.adapters import (
    fold_input_transforms,
    fold_weight_transforms,
    insert_input_transform,
    insert_weight_transform,
    weight_groups,
)

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _skew(q: torch.Tensor, block_size: int) -> torch.Tensor:
    """``Q_j = M_j − M_jᵀ`` for each row of ``q`` (``M_j`` strict upper triangle in triu_indices order)."""
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=q.device)
    upper = q.new_zeros(q.shape[0], block_size, block_size)
    upper = upper.index_put((torch.arange(q.shape[0], device=q.device)[:, None], rows, cols), q)
    return upper - upper.transpose(-1, -2)


def _eliminate(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``A⁻¹B`` for a batch by Gauss–Jordan elimination without pivoting, unrolled into plain tensor ops.

    Used for the exact Cayley transform in inference graphs (``aten.linalg_solve`` does not export to
    ONNX). ``A = I − Q`` with ``Q`` skew has symmetric part ``I``, so every leading principal minor is
    non-zero and elimination needs no pivoting.
    """
    n = a.shape[-1]
    aug = torch.cat([a, b], dim=-1)
    eye = torch.eye(n, dtype=a.dtype, device=a.device)
    for k in range(n):
        row = aug[:, k, :] / aug[:, k, k:k + 1]
        col = aug[:, :, k] - eye[k]
        aug = aug - col[:, :, None] * row[:, None, :]
    return aug[:, :, n:]


def cayley_neumann(q: torch.Tensor, block_size: int, neumann_terms: int, exact: str = "solve") -> torch.Tensor:
    """The rotations ``R_j`` (shape ``(in/b, b, b)``) from the parameter ``q`` (shape ``(in/b, b(b−1)/2)``).

    ``R_j = (I + Q_j) Σ_{i=0}^{K−1} Q_j^i`` for ``K = neumann_terms ≥ 1``; ``K = 0``: ``(I + Q_j)(I − Q_j)⁻¹``
    exactly (``exact="solve"``: ``torch.linalg.solve``; ``"elimination"``: unrolled Gauss–Jordan, exportable).
    """
    skew = _skew(q, block_size)
    eye = torch.eye(block_size, dtype=q.dtype, device=q.device)
    plus = eye + skew
    if neumann_terms == 0:
        minus = eye - skew
        if exact == "elimination":
            return _eliminate(minus, plus)  # (I−Q)⁻¹(I+Q) = (I+Q)(I−Q)⁻¹: the factors commute
        return torch.linalg.solve(minus, plus)
    series = eye.expand_as(skew)
    for _ in range(neumann_terms - 1):  # Horner: S ← I + Q S gives Σ_{i=0}^{K−1} Q^i
        series = eye + skew @ series
    return plus @ series


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def oftv2_transform(x: torch.Tensor, q: torch.Tensor, block_size: int, neumann_terms: int,
                    exact: str = "solve") -> torch.Tensor:
    """Rotate the blocks of ``x``'s last dim: ``x_j ← x_j R_j`` (fp16/bf16 computed in float32, cast back)."""
    dtype = _compute_dtype(x.dtype)
    rotation = cayley_neumann(q.to(dtype), block_size, neumann_terms, exact)
    # computed transposed, (R_jᵀ x_jᵀ)ᵀ = x_j R_j: on CPU, bmm with the row count as the wide last dim ran
    # ~1.3× faster than rows-major blocks in the training step (see docs/methods/oftv2.md, Benchmark)
    columns = x.to(dtype).reshape(-1, q.shape[0], block_size).permute(1, 2, 0)  # (in/b, b, rows) = x_jᵀ
    rotated = torch.bmm(rotation.transpose(1, 2), columns).permute(2, 0, 1)  # (rows, in/b, b)
    return rotated.reshape(x.shape).to(x.dtype)


def _rotate_weight(weight: torch.Tensor, q: torch.Tensor, block_size: int, neumann_terms: int, exact: str,
                   dtype: torch.dtype) -> torch.Tensor:
    """``W′ = W R_bdᵀ`` per group, computed in ``dtype``: each filter ``W_o`` (``in`` values, a conv filter
    flattened channel-major) of group ``g`` becomes ``W_o R_gᵀ``; ``groups = rows(q)·b / in``."""
    rotation = cayley_neumann(q.to(dtype), block_size, neumann_terms, exact)
    per_filter = weight[0].numel()
    groups = q.shape[0] * block_size // per_filter
    blocks = weight.to(dtype).reshape(groups, weight.shape[0] // groups, per_filter // block_size, block_size)
    rotation = rotation.reshape(groups, per_filter // block_size, block_size, block_size)
    return torch.einsum("gojc,gjac->goja", blocks, rotation).reshape(weight.shape).to(weight.dtype)


def oftv2_conv_weight(weight: torch.Tensor, q: torch.Tensor, block_size: int, neumann_terms: int,
                      exact: str = "solve") -> torch.Tensor:
    """``W′ = W R_bdᵀ`` for a conv weight ``(out, C/g, kh, kw)``, in its dtype (fp16/bf16 computed in
    float32): the conv layers' form in training."""
    return _rotate_weight(weight, q, block_size, neumann_terms, exact, _compute_dtype(weight.dtype))


def oftv2_fold_weight(weight: torch.Tensor, q: torch.Tensor, block_size: int, neumann_terms: int,
                      exact: str = "solve") -> torch.Tensor:
    """``W′ = W R_bdᵀ`` for ``W`` in ``(out, in)`` layout or a conv weight (at least float32), for folding."""
    dtype = torch.promote_types(_compute_dtype(weight.dtype), torch.float32)
    return _rotate_weight(weight, q, block_size, neumann_terms, exact, dtype)


def _divisors(n: int) -> list[int]:
    return [d for d in range(2, n + 1) if n % d == 0]


class OFTv2(graphopt.Method):
    """OFTv2 (Qiu et al. 2025): block-diagonal Cayley–Neumann rotation of each targeted layer's input.

    ``W′ = W R_bdᵀ``, ``R_bd = blockdiag(R_j)``, ``R_j = (I + Q_j) Σ_{i=0}^{K−1} Q_j^i`` (``K = neumann_terms``;
    ``K = 0``: exact Cayley ``(I + Q_j)(I − Q_j)⁻¹``), ``Q_j = M_j − M_jᵀ`` from parameter ``oftv2_q``.
    PEFT's (≥ 0.18) ``num_cayley_neumann_terms = N`` computes ``I + 2Σ_{i=1}^{N−2} Q^i + Q^{N−1}``, which is ours
    with ``K = N − 1`` for ``N ≥ 4``; see docs/methods/oftv2.md.
    """

    name = "oftv2"
    stage = "forward"

    def __init__(self, block_size: int = 32, targets: str | list[str] | None = None, neumann_terms: int = 4) -> None:
        self.block_size, self.targets, self.neumann_terms = block_size, targets, neumann_terms
        self.check(block_size >= 2, "block_size", "use an integer block_size >= 2 that divides in_features")
        self.check(neumann_terms >= 0, "neumann_terms",
                   "use neumann_terms >= 0 (0: exact Cayley by a solve; K >= 1: K Neumann terms)")

    def apply(self, gm: torch.fx.GraphModule, ctx: graphopt.MethodContext) -> None:
        """Insert ``oftv2_transform(x, q)`` before every targeted linear/addmm call (``oftv2_conv_weight(W, q)``
        for a Conv2d); add ``<path>.oftv2_q``. Default targets: linear layers only."""
        kinds = ("linear", "addmm") if self.targets is None else ("linear", "addmm", "conv2d", "conv1d")
        layers = ctx.select(self.targets, kinds, what="linear or conv2d")
        b = self.block_size
        for layer in layers:
            if layer.in_features % b:
                sizes = [d for d in _divisors(layer.in_features) if d <= 256]
                raise OptionError(
                    f"method {self.name!r}: option block_size={b} does not divide in_features={layer.in_features} "
                    f"of layer {layer.path!r}; block sizes that divide it: {sizes}"
                )
        for calls in weight_groups(ctx, layers):  # a shared weight: one rotation, applied at every call
            layer = calls[0]
            weight = ctx.parameter(layer.weight.target)
            dtype = weight.dtype if weight.dtype.is_floating_point else torch.get_default_dtype()
            groups = layer.conv_options["groups"] if layer.kind in ("conv2d", "conv1d") else 1
            init = torch.zeros(groups * layer.in_features // b, b * (b - 1) // 2, dtype=dtype, device=weight.device)
            name = ctx.add_parameter(layer.path, "q", init)
            options = {"block_size": b, "neumann_terms": self.neumann_terms}
            for call in calls:
                if call.kind in ("conv2d", "conv1d"):
                    insert_weight_transform(ctx, call, oftv2_conv_weight, [name], **options)
                else:
                    insert_input_transform(ctx, call, oftv2_transform, [name], **options)
        if self.neumann_terms == 0:
            ctx.add_inference_pass(_exact_by_elimination)
        ctx.add_export_pass(_fold, merge=True)


def _exact_by_elimination(gm: torch.fx.GraphModule) -> None:
    """Inference pass for ``K = 0``: the exact Cayley transform by unrolled elimination, so it exports."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (oftv2_transform, oftv2_conv_weight):
            node.kwargs = {**node.kwargs, "exact": "elimination"}


def _fold(gm: torch.fx.GraphModule) -> None:
    """Export with ``merge=True``: ``W ← W R_bdᵀ`` for every adapted layer (linear and conv)."""
    fold_input_transforms(gm, oftv2_transform, oftv2_fold_weight)
    fold_weight_transforms(gm, oftv2_conv_weight, oftv2_fold_weight)


def rotation_matrix(q: torch.Tensor, block_size: int, neumann_terms: int) -> torch.Tensor:
    """The dense ``R_bd = blockdiag(R_j)`` (``in × in``), for inspection; training never forms it."""
    return torch.block_diag(*cayley_neumann(q, block_size, neumann_terms).unbind(0))


@graphopt.hookimpl
def graphopt_register_methods(register):
    register(OFTv2)



__all__: Sequence[str] = ("OFTv2", "cayley_neumann", "oftv2_conv_weight", "oftv2_fold_weight", "oftv2_transform",
                          "rotation_matrix")
