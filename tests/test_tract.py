"""TrAct (Petersen, Borgelt, Ermon, NeurIPS 2024): the first layer's weight gradient is ``G (XᵀX/b + λI)⁻¹``.

References are written here from the paper's formula, densely in float64: the patch matrix of a conv
is built by explicit slicing (not ``F.unfold``), the inverse is formed explicitly (the plugin solves),
and the plain gradients come from ``torch.autograd`` on the plain ``torch.nn`` model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.builtin.tract import tract_conv2d, tract_linear

TRACT_OPS = (torch.ops.graphopt.tract_linear.default, torch.ops.graphopt.tract_conv2d.default)


# -- the reference, from the paper's formula ----------------------------------------------------------------


def dense_tract(grad: torch.Tensor, rows: torch.Tensor, lam: float) -> torch.Tensor:
    """``G (XᵀX/b + λI)⁻¹`` with the inverse formed explicitly (float64)."""
    b, n = rows.shape
    return grad @ torch.linalg.inv(rows.T @ rows / b + lam * torch.eye(n, dtype=rows.dtype))


def patch_rows(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
               dilation: tuple[int, int], group: int, groups: int) -> torch.Tensor:
    """Rows ``(N·H_out·W_out, C_g·kh·kw)`` of group ``group``'s patches, by slicing the padded input."""
    n, c, h, w = x.shape
    cg = c // groups
    xp = F.pad(x[:, group * cg:(group + 1) * cg], (padding[1], padding[1], padding[0], padding[0]))
    kh, kw = kernel
    h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    rows = torch.empty(n, h_out, w_out, cg, kh, kw, dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            top, left = i * dilation[0], j * dilation[1]
            window = xp[:, :, top:top + stride[0] * (h_out - 1) + 1:stride[0], left:left + stride[1] * (w_out - 1) + 1:
                        stride[1]]
            rows[:, :, :, :, i, j] = window.permute(0, 2, 3, 1)
    return rows.reshape(n * h_out * w_out, cg * kh * kw)


def conv_reference(x: torch.Tensor, grad_w: torch.Tensor, conv: dict, lam: float) -> torch.Tensor:
    """The TrAct weight gradient of a conv, group by group."""
    groups, out = conv["groups"], grad_w.shape[0]
    og = out // groups
    parts = []
    for g in range(groups):
        rows = patch_rows(x, tuple(grad_w.shape[2:]), conv["stride"], conv["padding"], conv["dilation"], g, groups)
        parts.append(dense_tract(grad_w[g * og:(g + 1) * og].reshape(og, -1), rows, lam))
    return torch.cat(parts).reshape(grad_w.shape)


# -- the op itself ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(32, 8), (4, 8), (3, 5, 8), (1, 3, 8)],
                         ids=["2d-b>=n", "2d-b<n", "3d-b>=n", "3d-b<n"])
def test_linear_gradients(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(*shape[:-1], 6, dtype=torch.float64)
    gx, gw, gb = torch.autograd.grad(tract_linear(x, w, b, 0.3), (x, w, b), dy)
    px, pw, pb = torch.autograd.grad(F.linear(x, w, b), (x, w, b), dy)
    assert torch.equal(tract_linear(x, w, b, 0.3), F.linear(x, w, b))
    torch.testing.assert_close(gw, dense_tract(pw, x.detach().reshape(-1, 8), 0.3), rtol=0, atol=1e-10)
    assert torch.equal(gx, px) and torch.equal(gb, pb)
    assert not torch.allclose(gw, pw, atol=1e-3)  # the replaced gradient really differs


CONVS = {
    "plain": dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1),
    "stride-pad": dict(stride=(2, 1), padding=(1, 2), dilation=(1, 1), groups=1),
    "dilation-groups": dict(stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=2),
    "depthwise": dict(stride=(2, 2), padding=(1, 1), dilation=(1, 1), groups=4),
}


@pytest.mark.parametrize("batch", [3, 1], ids=["b>=n", "b<n"])
@pytest.mark.parametrize("name", list(CONVS))
def test_conv2d_gradients(name: str, batch: int) -> None:
    torch.manual_seed(1)
    conv = CONVS[name]
    c_in, out, kernel = 4, 8, (3, 3)
    size = (7, 6) if batch > 1 else (3, 3)  # b < n: one image, a few output positions, n = C/g·9
    x = torch.randn(batch, c_in, *size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(out, c_in // conv["groups"], *kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(out, dtype=torch.float64, requires_grad=True)
    args = (conv["stride"], conv["padding"], conv["dilation"], conv["groups"])
    y = tract_conv2d(x, w, b, *args, 0.2)
    plain = F.conv2d(x, w, b, *args)
    assert torch.equal(y, plain)
    dy = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy)
    px, pw, pb = torch.autograd.grad(plain, (x, w, b), dy)
    rows = patch_rows(x.detach(), kernel, conv["stride"], conv["padding"], conv["dilation"], 0, conv["groups"])
    assert (rows.shape[0] >= rows.shape[1]) == (batch > 1)  # both branches (Cholesky and Woodbury) are covered
    torch.testing.assert_close(gw, conv_reference(x.detach(), pw, conv, 0.2), rtol=0, atol=1e-10)
    assert torch.equal(gx, px) and torch.equal(gb, pb)


def test_half_precision_is_computed_in_float32() -> None:
    torch.manual_seed(2)
    x = torch.randn(64, 16).half()
    w = torch.randn(4, 16).half().requires_grad_()
    dy = torch.randn(64, 4).half()
    (gw,) = torch.autograd.grad(tract_linear(x, w, None, 1e-3), (w,), dy)
    assert gw.dtype == torch.float16
    expected = dense_tract(dy.double().T @ x.double(), x.double(), 1e-3)
    # the float64 answer rounded to half: the float32 computation reaches it to about one half-precision ulp
    torch.testing.assert_close(gw.double(), expected.half().double(), rtol=2e-3, atol=2e-3)


# -- the rewrite --------------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """Conv2d first (stride, padding, dilation, groups), then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2)
        self.conv2 = nn.Conv2d(6, 5, 2, dilation=2)
        self.head = nn.Linear(5 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x))
        return self.head(torch.tanh(self.conv2(h)).flatten(1))


class Reordered(nn.Module):
    """``late`` is defined first but called second: execution order decides the first layer."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Linear(6, 3)
        self.early = nn.Linear(5, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.late(torch.relu(self.early(x)))


def tract_layers(gm: torch.fx.GraphModule) -> list[str]:
    return [n.args[1].target for n in gm.graph.nodes if n.op == "call_function" and n.target in TRACT_OPS]


def test_rewrite_picks_first_layer_in_execution_order() -> None:
    x = torch.randn(4, 5)
    m = graphopt.compile(Reordered(), methods=["tract"], example_inputs=(x,), backend="eager")
    assert tract_layers(m.graph_module) == ["early.weight"]
    named = graphopt.compile(Reordered(), methods=["tract(layer='late')"], example_inputs=(x,), backend="eager")
    assert tract_layers(named.graph_module) == ["late.weight"]


def test_every_call_of_the_layer_is_rewritten() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.tanh(self.fc(x)))

    m = graphopt.compile(Twice(), methods=["tract"], example_inputs=(torch.randn(3, 4),), backend="eager")
    assert tract_layers(m.graph_module) == ["fc.weight", "fc.weight"]


def _grads_through_compiled(model: nn.Module, methods: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    m = graphopt.compile(model, methods=methods, example_inputs=(x,), backend="eager")
    m(x).square().sum().backward()
    return {n: p.grad for n, p in m.trainable_parameters().items()}


@pytest.mark.parametrize("batch", [5, 1], ids=["b>=n", "b<n"])
def test_compiled_model_gradients(batch: int) -> None:
    """``m(x).backward()``: the first layer gets TrAct's gradient, every other parameter the plain one."""
    torch.manual_seed(3)
    net = SmallCNN().double()
    x = torch.randn(batch, 4, 7, 7, dtype=torch.float64)
    grads = _grads_through_compiled(copy.deepcopy(net), ["tract(lam=0.05)"], x)
    plain = dict(zip([n for n, _ in net.named_parameters()],
                     torch.autograd.grad(net(x).square().sum(), list(net.parameters()))))
    conv = dict(stride=(2, 2), padding=(1, 1), dilation=(1, 1), groups=2)
    torch.testing.assert_close(grads["conv.weight"], conv_reference(x, plain["conv.weight"], conv, 0.05),
                               rtol=0, atol=1e-10)
    for name in plain:
        if name != "conv.weight":
            assert torch.equal(grads[name], plain[name]), name


def test_linear_first_layer_three_dims() -> None:
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 2)).double()
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    grads = _grads_through_compiled(copy.deepcopy(net), ["tract(lam=0.2)"], x)
    plain = torch.autograd.grad(net(x).square().sum(), list(net.parameters()))
    torch.testing.assert_close(grads["0.weight"], dense_tract(plain[0], x.reshape(-1, 6), 0.2), rtol=0, atol=1e-10)
    for (name, _), expected in zip(list(net.named_parameters())[1:], plain[1:]):
        assert torch.equal(grads[name], expected), name


# -- through .step ------------------------------------------------------------------------------------------


def reference_sgd_steps(net: nn.Module, batches: list, lam: float, lr: float, momentum: float) -> nn.Module:
    """Plain PyTorch: autograd, the first conv's gradient replaced by the dense formula, torch.optim.SGD."""
    net = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    conv = dict(stride=(2, 2), padding=(1, 1), dilation=(1, 1), groups=2)
    for x, t in batches:
        opt.zero_grad()
        F.cross_entropy(net(x), t).backward()
        with torch.no_grad():
            net.conv.weight.grad = conv_reference(x, net.conv.weight.grad, conv, lam)
        opt.step()
    return net


def make_batches(n: int, batch: int, dtype: torch.dtype) -> list:
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(batch, 4, 7, 7, generator=gen, dtype=dtype), torch.randint(0, 3, (batch,), generator=gen))
            for _ in range(n)]


def test_step_sgd_equals_reference_step() -> None:
    torch.manual_seed(6)
    net = SmallCNN().double()
    batches = make_batches(3, 6, torch.float64)
    m = graphopt.compile(copy.deepcopy(net), methods=["tract(lam=0.05)", "sgd(lr=0.1, momentum=0.9)"],
                         loss_fn=F.cross_entropy, backend="eager")
    for x, t in batches:
        m.step(x, t)
    expected = reference_sgd_steps(net, batches, 0.05, 0.1, 0.9)
    got = m.trainable_parameters()
    for name, param in expected.named_parameters():
        torch.testing.assert_close(got[name], param, rtol=0, atol=1e-10)
    # and it is not plain SGD
    plain = copy.deepcopy(net)
    opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    for x, t in batches:
        opt.zero_grad()
        F.cross_entropy(plain(x), t).backward()
        opt.step()
    assert (got["conv.weight"] - plain.conv.weight).abs().max() > 1e-3


def test_step_adamw_equals_reference_step() -> None:
    if "adamw" not in graphopt.list_methods():
        pytest.skip("the adamw plugin is not implemented yet")
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    gen = torch.Generator().manual_seed(8)
    batches = [(torch.randn(4, 10, generator=gen, dtype=torch.float64), torch.randint(0, 3, (4,), generator=gen))
               for _ in range(3)]  # b = 4 < n = 10: the Woodbury branch inside the step
    m = graphopt.compile(copy.deepcopy(net), methods=["tract(lam=0.1)", "adamw(lr=1e-2, weight_decay=0.1)"],
                         loss_fn=F.cross_entropy, backend="eager")
    ref = copy.deepcopy(net)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    for x, t in batches:
        m.step(x, t)
        opt.zero_grad()
        F.cross_entropy(ref(x), t).backward()
        with torch.no_grad():
            ref[0].weight.grad = dense_tract(ref[0].weight.grad, x, 0.1)
        opt.step()
    got = m.trainable_parameters()
    for name, param in ref.named_parameters():
        torch.testing.assert_close(got[name], param, rtol=0, atol=1e-10)


def test_step_inductor_matches_eager() -> None:
    """One inductor build of the whole step (the custom op inside ``torch.compile(fullgraph=True)``)."""
    torch.manual_seed(9)
    net = SmallCNN()
    batches = make_batches(2, 6, torch.float32)
    models = {backend: graphopt.compile(copy.deepcopy(net), methods=["tract(lam=0.05)", "sgd(lr=0.1)"],
                                        loss_fn=F.cross_entropy, backend=backend) for backend in ("eager", "inductor")}
    for x, t in batches:
        losses = {backend: m.step(x, t) for backend, m in models.items()}
        torch.testing.assert_close(losses["inductor"], losses["eager"], rtol=1e-5, atol=1e-5)
    eager = dict(models["eager"].named_parameters())
    for name, param in models["inductor"].named_parameters():
        torch.testing.assert_close(param, eager[name], rtol=1e-4, atol=1e-5)
    ref = reference_sgd_steps(net.double(), [(x.double(), t) for x, t in batches], 0.05, 0.1, 0.0)
    torch.testing.assert_close(eager["conv.weight"].double(), ref.conv.weight, rtol=0, atol=1e-4)


def test_torch_compile_fullgraph_and_export() -> None:
    """The op by itself under dynamo + AOTAutograd (fullgraph) and under torch.export."""
    torch.manual_seed(10)
    x = torch.randn(6, 5, dtype=torch.float64)
    w = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)

    def loss(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return tract_linear(x, w, None, 0.5).sin().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    (got,) = torch.autograd.grad(compiled(x, w), (w,))
    (plain,) = torch.autograd.grad(F.linear(x, w).sin().sum(), (w,))
    torch.testing.assert_close(got, dense_tract(plain, x, 0.5), rtol=0, atol=1e-10)

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(w.detach().clone())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return tract_linear(x, self.w, None, 0.5)

    program = torch.export.export(Layer(), (x,))
    assert any(n.target is TRACT_OPS[0] for n in program.graph.nodes)
    assert torch.equal(program.module()(x), F.linear(x, w.detach()))


# -- export ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("merge", [True, False])
def test_export_onnx(tmp_path, merge: bool) -> None:
    import onnx

    torch.manual_seed(11)
    x = torch.randn(3, 4, 7, 7)
    m = graphopt.compile(SmallCNN(), methods=["tract", "sgd(lr=0.1)"], loss_fn=F.cross_entropy, backend="eager")
    m.step(x, torch.tensor([0, 1, 2]))
    gm = m.export_graph(merge=merge)
    assert len(tract_layers(gm)) == (0 if merge else 1)
    report = graphopt.export(m.eval(), tmp_path / "cnn.onnx", example_inputs=(x,), merge=merge)
    assert report.max_abs_diff < 1e-4  # graphopt.export ran the file in onnxruntime against PyTorch
    ops = [(n.domain, n.op_type) for n in onnx.load(str(tmp_path / "cnn.onnx")).graph.node]
    assert sum(op == "Conv" for _, op in ops) == 2 and all(d in ("", "ai.onnx") for d, _ in ops)

    mlp = graphopt.compile(Reordered(), methods=["tract"], example_inputs=(torch.randn(2, 5),), backend="eager")
    report = graphopt.export(mlp.eval(), tmp_path / "mlp.onnx", example_inputs=(torch.randn(2, 5),), merge=merge)
    assert report.max_abs_diff < 1e-5


def test_export_pt2_without_merge(tmp_path) -> None:
    x = torch.randn(2, 4, 7, 7)
    m = graphopt.compile(SmallCNN(), methods=["tract"], example_inputs=(x,), backend="eager")
    report = graphopt.export(m.eval(), tmp_path / "cnn.pt2", merge=False)
    assert report.max_abs_diff == 0


# -- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0, -0.1])
def test_lam_must_be_positive(lam: float) -> None:
    with pytest.raises(graphopt.OptionError, match=r"'tract'.*lam.*lam > 0"):
        graphopt.compile(Reordered(), methods=[f"tract(lam={lam})"])


class Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, i: torch.Tensor) -> torch.Tensor:
        return self.norm(self.emb(i)).sum(-1)


def test_named_layer_that_is_not_conv_or_linear() -> None:
    x = torch.randn(4, 5)
    with pytest.raises(graphopt.OptionError, match=r"layer='nope' names no layer.*early, late"):
        graphopt.compile(Reordered(), methods=["tract(layer='nope')"], example_inputs=(x,), backend="eager")
    idx = torch.tensor([[1, 2, 3]])
    with pytest.raises(graphopt.OptionError, match=r"layer='norm' is a LayerNorm module, not a Conv2d or Linear"):
        graphopt.compile(Embedder(), methods=["tract(layer='norm')"], example_inputs=(idx,), backend="eager")
    with pytest.raises(graphopt.OptionError, match=r"layer='emb' is an Embedding module"):
        graphopt.compile(Embedder(), methods=["tract(layer='emb')"], example_inputs=(idx,), backend="eager")


def test_model_without_conv_or_linear() -> None:
    with pytest.raises(graphopt.OptionError, match=r"no Conv2d or Linear layer.*embeddings.*layer="):
        graphopt.compile(Embedder(), methods=["tract"], example_inputs=(torch.tensor([[1, 2]]),), backend="eager")
