"""``tract``: TrAct, training the first layer's pre-activations (Petersen, Borgelt, Ermon, NeurIPS 2024).

TrAct ("TrAct: Making First-layer Pre-Activations Trainable", Petersen, Borgelt and Ermon, NeurIPS
2024) changes only the weight gradient of the first layer. With ``X ∈ R^{b×n}`` the layer's input rows
(Linear: all leading dims flattened; Conv2d: the unfolded patches, per group, ``b = N·H_out·W_out``)
and ``G = dYᵀX ∈ R^{m×n}`` the usual weight gradient, the weight gradient becomes

    ∇W ← G (XᵀX / b + λI)⁻¹,

the least-squares step that moves the pre-activations ``Y = X Wᵀ`` towards ``Y − η·dY`` (ridge λ),
so that the first layer learns about as fast as the later ones whatever the scale of its inputs.
The forward pass, the input gradient and the bias gradient are those of the plain layer.

The system is solved, never inverted: a Cholesky factorisation of the SPD ``n×n`` matrix when
``b ≥ n``; when ``b < n`` the Woodbury form ``(XᵀX/b + λI)⁻¹ = (I − Xᵀ(XXᵀ + bλI)⁻¹X)/λ`` factors the
``b×b`` matrix instead. Everything is computed in (at least) float32, also for half-precision inputs.

The rewritten call is a ``torch.library.custom_op`` (``graphopt::tract_linear`` /
``graphopt::tract_conv2d``) whose backward is registered with ``register_autograd``: it runs eagerly,
under ``torch.compile(fullgraph=True)``, inside graphopt's ``make_fx`` trace of the training step
(``torch.autograd.grad``) and under ``torch.export``. ``torch.func.grad`` rejects such an op (a known
PyTorch limitation); graphopt does not use it. For export, ``merge=True`` puts the plain
``aten.linear``/``aten.conv2d`` back (an export pass); ``merge=False`` keeps the op and translates it to
the plain ONNX ``MatMul`` + ``Add`` / ``Conv`` (ONNX translations).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

import graphopt
from graphopt.errors import OptionError
from graphopt.rewrite.layers import call_path, module_types
from graphopt.rewrite.meta import set_layer_path

aten = torch.ops.aten

# -- the preconditioned weight gradient ----------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (half, bfloat16, float32) is computed in float32."""
    return torch.promote_types(dtype, torch.float32)


def precondition(grad: torch.Tensor, lam: float, rows: torch.Tensor) -> torch.Tensor:
    """``G (XᵀX/b + λI)⁻¹`` for a batch of groups: ``grad (g, m, n)``, ``rows X (g, b, n)``; returns ``(g, m, n)``.

    ``b ≥ n``: Cholesky of ``M = XᵀX/b + λI`` and ``(G M⁻¹)ᵀ = M⁻¹ Gᵀ`` by ``cholesky_solve``.
    ``b < n``: Woodbury, ``G M⁻¹ = (G − (G Xᵀ)(XXᵀ + bλI)⁻¹ X)/λ``, a ``b×b`` Cholesky.
    """
    b, n = rows.shape[-2], rows.shape[-1]
    if b >= n:
        gram = rows.transpose(-1, -2) @ rows
        system = gram / b + lam * torch.eye(n, dtype=gram.dtype, device=gram.device)
        factor, _ = torch.linalg.cholesky_ex(system)
        return torch.cholesky_solve(grad.transpose(-1, -2), factor).transpose(-1, -2)
    kernel = rows @ rows.transpose(-1, -2)
    system = kernel + (b * lam) * torch.eye(b, dtype=rows.dtype, device=rows.device)
    factor, _ = torch.linalg.cholesky_ex(system)
    projected = grad @ rows.transpose(-1, -2)  # G Xᵀ, (g, m, b)
    solved = torch.cholesky_solve(projected.transpose(-1, -2), factor).transpose(-1, -2)  # G Xᵀ K⁻¹
    return (grad - solved @ rows) / lam


# -- linear -----------------------------------------------------------------------------------------------


@torch.library.custom_op("graphopt::tract_linear", mutates_args=())
def tract_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lam: float) -> torch.Tensor:
    """``aten.linear(x, weight, bias)`` whose weight gradient is TrAct's ``G (XᵀX/b + λI)⁻¹``."""
    return F.linear(x, weight, bias)


@tract_linear.register_fake
def _tract_linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lam: float) -> torch.Tensor:
    return F.linear(x, weight, bias)


def _linear_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, weight, bias, lam = inputs
    ctx.save_for_backward(x, weight)
    ctx.lam = lam
    ctx.has_bias = bias is not None


def _linear_backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grad_x = grad_w = grad_b = None
    if need_x:
        grad_x = grad_out @ weight
    if need_b and ctx.has_bias:
        grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    if need_w:
        dtype = _compute_dtype(x.dtype)
        rows = x.reshape(-1, x.shape[-1]).to(dtype)
        dy = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
        grad = dy.transpose(0, 1) @ rows
        grad_w = precondition(grad[None], ctx.lam, rows[None])[0].to(weight.dtype)
    return grad_x, grad_w, grad_b, None


tract_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


# -- conv2d -----------------------------------------------------------------------------------------------


@torch.library.custom_op("graphopt::tract_conv2d", mutates_args=())
def tract_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int], groups: int, lam: float) -> torch.Tensor:
    """``aten.conv2d(x, weight, bias, stride, padding, dilation, groups)`` with TrAct's weight gradient."""
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


@tract_conv2d.register_fake
def _tract_conv2d_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
                       padding: Sequence[int], dilation: Sequence[int], groups: int, lam: float) -> torch.Tensor:
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def _conv_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, weight, bias, stride, padding, dilation, groups, lam = inputs
    ctx.save_for_backward(x, weight)
    ctx.conf = (list(stride), list(padding), list(dilation), groups)
    ctx.lam = lam
    ctx.has_bias = bias is not None


def conv_rows(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
              dilation: Sequence[int], groups: int) -> torch.Tensor:
    """The input patches per group, ``(groups, N·H_out·W_out, C_in/groups·kh·kw)``, features in weight order.

    Built from strided views of the padded input and one copy into ``(groups, n, b)`` (contiguous runs
    along the image width), returned as its transposed view. Not ``im2col``: its per-image parallel
    loops stall on a busy CPU, and its ``(N, n, L)`` layout needs another copy.
    """
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    if any(padding):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    windows = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)  # (N, C, Ho, Wo, kh', kw')
    patches = windows[..., ::dh, ::dw]  # (N, C, Ho, Wo, kh, kw), a view
    n_batch, _, h_out, w_out = patches.shape[:4]
    cols = patches.permute(1, 4, 5, 0, 2, 3).reshape(groups, -1, n_batch * h_out * w_out)
    return cols.transpose(1, 2)


def _conv_backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
    x, weight = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conf
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dtype = _compute_dtype(x.dtype)
    same = dtype == x.dtype
    bias_sizes = [weight.shape[0]] if ctx.has_bias else None
    mask = [need_x, need_w and same, need_b and ctx.has_bias]
    grad_x = grad_w = grad_b = None
    if any(mask):
        grad_x, grad_w, grad_b = aten.convolution_backward(
            grad_out, x, weight, bias_sizes, stride, padding, dilation, False, [0, 0], groups, mask)
    if need_w:
        if not same:  # half precision: the plain gradient too in float32
            grad_w = aten.convolution_backward(
                grad_out.to(dtype), x.to(dtype), weight.to(dtype), None, stride, padding, dilation, False, [0, 0],
                groups, [False, True, False])[1]
        out_ch = weight.shape[0]
        grad = grad_w.to(dtype).reshape(groups, out_ch // groups, -1)
        rows = conv_rows(x.to(dtype), weight.shape[2:], stride, padding, dilation, groups)
        grad_w = precondition(grad, ctx.lam, rows).reshape(weight.shape).to(weight.dtype)
    return grad_x, grad_w, grad_b, None, None, None, None, None


tract_conv2d.register_autograd(_conv_backward, setup_context=_conv_setup)


# -- ONNX translations (merge=False) --------------------------------------------------------------------


def _onnx_linear(x: Any, weight: Any, bias: Any = None, lam: float = 0.1) -> Any:
    from onnxscript import opset18 as op

    y = op.MatMul(x, op.Transpose(weight, perm=[1, 0]))
    return y if bias is None else op.Add(y, bias)


def _onnx_conv2d(x: Any, weight: Any, bias: Any = None, stride: Sequence[int] = (1, 1),
                 padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), groups: int = 1,
                 lam: float = 0.1) -> Any:
    from onnxscript import opset18 as op

    attrs = {"strides": list(stride), "pads": [*padding, *padding], "dilations": list(dilation), "group": groups}
    return op.Conv(x, weight, **attrs) if bias is None else op.Conv(x, weight, bias, **attrs)


# -- the method -----------------------------------------------------------------------------------------

_TRACT_OPS = {torch.ops.graphopt.tract_linear.default: aten.linear.default,
              torch.ops.graphopt.tract_conv2d.default: aten.conv2d.default}


_KINDS = ("linear", "conv2d", "conv1d")


def _unsqueezed(gm: torch.fx.GraphModule, before: torch.fx.Node, value: torch.fx.Node, dim: int) -> torch.fx.Node:
    with gm.graph.inserting_before(before):
        return gm.graph.call_function(aten.unsqueeze.default, (value, dim))


def _pair(value: Any) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return values * 2 if len(values) == 1 else values


class _WeightedCall(NamedTuple):
    node: torch.fx.Node
    path: str


def _first_weighted_call(gm: torch.fx.GraphModule) -> _WeightedCall | None:
    """The first call in execution order that reads a parameter matrix (≥ 2 dims) under any of its names (a
    tied weight has several): the model's first layer, whatever its kind (a Linear, a Conv2d, an embedding
    lookup, a Conv1D ``addmm``), named by the module that runs it."""
    params = dict(gm.named_parameters(remove_duplicate=False))
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        for arg in node.args:
            if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
                weight = params.get(arg.target)
                if weight is not None and weight.dim() >= 2:
                    return _WeightedCall(node, call_path(gm, node, arg))
    return None


class TrAct(graphopt.Method):
    """TrAct (Petersen et al., NeurIPS 2024): the first layer's weight gradient becomes ``G (XᵀX/b + λI)⁻¹``.

    ``lam``: the ridge λ > 0 (the paper's default 0.1). ``layer``: the module path of the layer to
    rewrite (a Linear or Conv2d); None takes the first Linear/Conv2d call in execution order. Every
    call of that layer (a module called twice) is rewritten.
    """

    name = "tract"
    stage = "forward"

    def __init__(self, lam: float = 0.1, layer: str | None = None) -> None:
        self.lam, self.layer = lam, layer
        self.check(lam > 0, "lam", "use lam > 0 (the ridge λ of (XᵀX/b + λI); the paper uses 0.1)")
        self.check(layer is None or bool(layer), "layer", "use a module path such as 'conv1', or None")

    def _target_path(self, ctx: graphopt.MethodContext) -> str:
        gm = ctx.graph_module
        layers = ctx.layers(_KINDS)
        if self.layer is None:
            if not layers:
                raise OptionError(
                    "method 'tract': the model has no Conv2d or Linear layer (nor a Conv1d) to rewrite (embeddings, "
                    "for example, are not Conv/Linear); name the layer to precondition with layer='<module path>' "
                    "(it must be a Conv2d, Conv1d or Linear called on a module weight)")
            first = _first_weighted_call(gm)
            if first is not None and first.node is not layers[0].node:
                available = ", ".join(dict.fromkeys(layer.path for layer in layers))
                raise OptionError(
                    f"method 'tract': the first layer in execution order is {first.path!r} "
                    f"({first.node.target}), which is not a Conv2d, Conv1d or Linear layer (an embedding, for example, "
                    f"has no input rows to precondition); name the layer with layer='<module path>'; "
                    f"the Conv1d/Conv2d/Linear layers are: {available}")
            return layers[0].path
        if any(layer.path == self.layer for layer in layers):
            return self.layer
        available = ", ".join(dict.fromkeys(layer.path for layer in layers)) or "none"
        module_type = module_types(gm).get(self.layer)
        kind = None if module_type is None else f"{'an' if module_type[0] in 'AEIOU' else 'a'} {module_type} module"
        if any(layer.path == self.layer for layer in ctx.layers(("addmm",))):
            kind = "an addmm layer (weight stored (in, out), e.g. transformers' Conv1D)"
        if kind is not None:
            raise OptionError(
                f"method 'tract': option layer={self.layer!r} is {kind}, not a Conv2d or Linear layer (nor a Conv1d); "
                f"the Conv1d/Conv2d/Linear layers are: {available}")
        raise OptionError(
            f"method 'tract': option layer={self.layer!r} names no layer of the model; "
            f"the Conv1d/Conv2d/Linear layers are: {available}")

    def apply(self, gm: torch.fx.GraphModule, ctx: graphopt.MethodContext) -> None:
        """Replace every call of the chosen layer by ``graphopt::tract_linear`` / ``graphopt::tract_conv2d``;
        export puts the plain layer back (``merge=True``) or translates the op to plain ONNX (``merge=False``)."""
        path = self._target_path(ctx)
        lam = float(self.lam)
        calls = [layer for layer in ctx.layers(_KINDS) if layer.path == path]
        for layer in calls:
            node = layer.node
            x, weight = node.args[:2]
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            if layer.kind == "linear":
                node.target, node.args = torch.ops.graphopt.tract_linear.default, (x, weight, bias, lam)
            else:
                defaults = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}
                conf = [node.args[3 + i] if len(node.args) > 3 + i else node.kwargs.get(k, d)
                        for i, (k, d) in enumerate(defaults.items())]
                if layer.kind == "conv1d":  # as a conv2d over (1, L) images: the same rows, the same formula
                    x, weight = _unsqueezed(gm, node, x, 2), _unsqueezed(gm, node, weight, 2)
                    (s,), (p,), (d,) = (_pair(v)[:1] for v in conf[:3])
                    conf = [[1, s], [0, p], [1, d], conf[3]]
                stride, padding, dilation = (_pair(v) for v in conf[:3])
                node.target = torch.ops.graphopt.tract_conv2d.default
                node.args = (x, weight, bias, stride, padding, dilation, int(conf[3]), lam)
                if layer.kind == "conv1d":
                    with gm.graph.inserting_after(node):
                        squeezed = gm.graph.call_function(aten.squeeze.dim, (node, 2))
                    node.replace_all_uses_with(squeezed, delete_user_cb=lambda user, keep=squeezed: user is not keep)
            node.kwargs = {}
            set_layer_path(node, path)
        readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == calls[0].weight.target]
        uses = sum(len(n.users) for n in readers)
        if len(calls) > 1 or uses > len(calls):
            ctx.add_description(
                f"tract: {path}'s weight is used {uses} times ({len(calls)} call(s) of the layer); each call's weight "
                "gradient is preconditioned with that call's own input rows, and the weight's gradient is the sum "
                "over its uses (other uses, e.g. a tied embedding, add their plain gradient)")
        ctx.add_export_pass(_plain_layers, merge=True)
        ctx.add_onnx_translation(torch.ops.graphopt.tract_linear.default, _onnx_linear)
        ctx.add_onnx_translation(torch.ops.graphopt.tract_conv2d.default, _onnx_conv2d)
        ctx.add_description(f"tract(lam={self.lam}) on {path}")


def _plain_layers(gm: torch.fx.GraphModule) -> None:
    """Export with ``merge=True``: the plain ``aten.linear`` / ``aten.conv2d`` back (TrAct changes training only)."""
    for node in gm.graph.nodes:
        plain = _TRACT_OPS.get(node.target) if node.op == "call_function" else None
        if plain is not None:
            node.target, node.args = plain, tuple(node.args[:-1])
    gm.recompile()


@graphopt.hookimpl
def graphopt_register_methods(register):
    register(TrAct)

