"""HRA and OFTv2 on Conv2d layers against the real ``peft`` package and an independent reference.

The same adapter values are loaded into PEFT's layer and graphopt's; outputs and gradients (adapter and input)
agree to 1e-5 in float32 wherever PEFT is right. Where it is not, the reference is written here from the
formula: the dense adapted weight ``W′`` (``W R`` for HRA, ``W R_bdᵀ`` per group for OFT) applied with
``F.conv2d`` and the layer's own stride, padding, dilation and groups. What PEFT 0.21 gets wrong (checked in
its source and here):

- OFT, unmerged, kernel > 1: it unfolds the input with stride 1 and no padding, rotates the patches and
  *folds them back* (``F.fold`` sums overlapping patches) before running the base conv, so even at init
  (``R = I``) the layer no longer computes the base conv: every pixel is scaled by the number of patches
  covering it. Its merged weight (``W R_bdᵀ`` on the flattened filter) is right: that is the reference.
- OFT: dilation > 1 is refused; merging a grouped conv fails (the weight is viewed as ``out × C·kh·kw``).
- HRA: the adapted conv runs with ``stride[0]``, ``padding[0]`` and no dilation (dilation is dropped);
  groups > 1 are refused; kernels are taken as square (``kernel_size[0]²``).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt

peft = pytest.importorskip("peft")


class ConvNet(nn.Module):
    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def make(kernel, stride=1, padding=0, dilation=1, groups=1, channels=(4, 6)) -> tuple[ConvNet, torch.Tensor]:
    torch.manual_seed(0)
    conv = nn.Conv2d(channels[0], channels[1], kernel, stride=stride, padding=padding, dilation=dilation,
                     groups=groups)
    return ConvNet(conv), torch.randn(2, channels[0], 9, 8)


def compiled(model: nn.Module, x: torch.Tensor, spec: str) -> graphopt.CompiledModel:
    return graphopt.compile(model, methods=[spec, "sgd(lr=0.1)"], backend="eager", example_inputs=(x,))


def run(forward, params: list[torch.Tensor], x: torch.Tensor, seed: int = 5):
    """Output and gradients (of ``params`` and ``x``) of ``Σ y ⊙ g`` with a fixed random ``g``."""
    x = x.clone().requires_grad_()
    y = forward(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad((y * g).sum(), [*params, x])
    return y.detach(), grads


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    assert a.shape == b.shape
    diff = (a - b).abs().max().item()
    assert diff <= tol * max(1.0, b.abs().max().item()), diff


# -- independent references --------------------------------------------------------------------------
def reflections(u: torch.Tensor) -> torch.Tensor:
    """``H_1 ⋯ H_r`` as explicit products of ``I − 2ûûᵀ``."""
    eye = torch.eye(u.shape[0], dtype=u.dtype)
    rot = eye
    for i in range(u.shape[1]):
        unit = u[:, i] / u[:, i].norm()
        rot = rot @ (eye - 2 * torch.outer(unit, unit))
    return rot


def cayley_neumann_blocks(q: torch.Tensor, b: int, terms: int) -> torch.Tensor:
    """``R_j = (I + Q_j) Σ_{i<K} Q_j^i`` per row of ``q`` (``K = 0``: ``(I + Q)(I − Q)⁻¹``)."""
    rows, cols = torch.triu_indices(b, b, 1)
    blocks = []
    for row in q:
        m = torch.zeros(b, b, dtype=q.dtype)
        m[rows, cols] = row
        skew, eye = m - m.t(), torch.eye(b, dtype=q.dtype)
        if terms == 0:
            blocks.append((eye + skew) @ torch.linalg.inv(eye - skew))
        else:
            blocks.append((eye + skew) @ sum(torch.linalg.matrix_power(skew, i) for i in range(terms)))
    return torch.stack(blocks)


def hra_reference(conv: nn.Conv2d, u: torch.Tensor):
    def forward(x: torch.Tensor) -> torch.Tensor:
        w = (conv.weight.reshape(conv.out_channels, -1) @ reflections(u)).reshape(conv.weight.shape)
        return F.conv2d(x, w, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return forward


def oft_reference(conv: nn.Conv2d, q: torch.Tensor, b: int, terms: int):
    """Each unfolded patch (``C·kh·kw``, channel-major) rotated by ``R_bd``: per group ``W_g R_gᵀ``."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        rot = torch.block_diag(*cayley_neumann_blocks(q, b, terms).unbind(0))
        per = conv.weight[0].numel()
        parts = []
        for g, w in enumerate(conv.weight.reshape(conv.groups, -1, per)):
            parts.append(w @ rot[g * per:(g + 1) * per, g * per:(g + 1) * per].t())
        w = torch.cat(parts).reshape(conv.weight.shape)
        return F.conv2d(x, w, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return forward


def test_oft_reference_is_peft_merged_weight() -> None:
    """The OFT reference's dense weight is the weight PEFT writes when it merges (a square kernel, groups 1)."""
    model, x = make(3, stride=2, padding=1)
    p = peft.get_peft_model(copy.deepcopy(model), peft.OFTConfig(r=0, oft_block_size=4, target_modules=["conv"],
                                                                 init_weights=False))
    q = p.base_model.model.conv.oft_R["default"].weight.detach().clone()
    merged = p.merge_and_unload()
    with torch.no_grad():
        assert_close(merged(x), oft_reference(model.conv, q, 4, 4)(x))


# -- HRA -----------------------------------------------------------------------------------------------
def hra_pair(model: ConvNet, x: torch.Tensor, r: int = 4):
    p = peft.get_peft_model(copy.deepcopy(model), peft.HRAConfig(r=r, target_modules=["conv"], init_weights=False))
    u_peft = p.base_model.model.conv.hra_u["default"]
    m = compiled(model, x, f"hra(r={r}, targets='conv')")
    u = m.graph_module.get_parameter("conv.hra_u")
    with torch.no_grad():
        u.copy_(u_peft)
    return p, u_peft, m, u


@pytest.mark.parametrize("kernel, stride, padding", [(3, 1, 1), (3, 2, 1), (1, 2, 0), (5, 1, 2)])
def test_hra_conv_equals_peft(kernel: int, stride: int, padding: int) -> None:
    model, x = make(kernel, stride, padding)
    p, u_peft, m, u = hra_pair(model, x)
    ours, peft_out = run(m, [u], x), run(p, [u_peft], x)
    reference = run(hra_reference(model.conv, u_peft.detach().clone().requires_grad_()), [], x)
    assert_close(ours[0], peft_out[0])
    assert_close(ours[0], reference[0])
    for a, b in zip(ours[1], peft_out[1]):
        assert_close(a, b)


@pytest.mark.parametrize("options", [dict(dilation=2, padding=2), dict(groups=2, padding=1),
                                     dict(kernel=(3, 1), stride=(2, 1), padding=(1, 0))])
def test_hra_conv_where_peft_is_wrong_equals_reference(options: dict) -> None:
    """Dilation (PEFT drops it), groups (PEFT refuses them: one R shared by the groups' filters here) and a
    non-square kernel with asymmetric stride: against the dense reference, gradients by autograd through it."""
    options = dict(options)
    model, x = make(options.pop("kernel", 3), **options)
    m = compiled(model, x, "hra(r=4, targets='conv')")
    u = m.graph_module.get_parameter("conv.hra_u")
    with torch.no_grad():
        u.copy_(torch.randn(u.shape, generator=torch.Generator().manual_seed(3)))
    ref_u = u.detach().clone().requires_grad_()
    ours, reference = run(m, [u], x), run(hra_reference(model.conv, ref_u), [ref_u], x)
    for a, b in zip((ours[0], *ours[1]), (reference[0], *reference[1])):
        assert_close(a, b)


def test_peft_hra_drops_dilation() -> None:
    """Why dilation is checked against the reference only: PEFT's HRA conv is not the base conv at R = I."""
    model, x = make(3, dilation=2, padding=2)
    p = peft.get_peft_model(copy.deepcopy(model), peft.HRAConfig(r=4, target_modules=["conv"]))  # paired: R = I
    m = compiled(model, x, "hra(r=4, targets='conv')")
    with torch.no_grad():
        base = model(x)
        assert_close(m(x), base)
        assert p(x).shape != base.shape   # run without dilation: a larger output


# -- OFT -----------------------------------------------------------------------------------------------
def oft_pair(model: ConvNet, x: torch.Tensor, b: int = 4, peft_terms: int = 5, ours_terms: int = 4):
    config = peft.OFTConfig(r=0, oft_block_size=b, target_modules=["conv"], init_weights=False,
                            num_cayley_neumann_terms=peft_terms)
    p = peft.get_peft_model(copy.deepcopy(model), config)
    q_peft = p.base_model.model.conv.oft_R["default"].weight
    m = compiled(model, x, f"oftv2(block_size={b}, neumann_terms={ours_terms}, targets='conv')")
    q = m.graph_module.get_parameter("conv.oftv2_q")
    with torch.no_grad():
        q.copy_(q_peft)
    return p, q_peft, m, q


@pytest.mark.parametrize("options", [dict(), dict(stride=2, padding=1), dict(groups=2, padding=1),
                                     dict(channels=(8, 4), groups=4, stride=(1, 2))])
def test_oft_1x1_conv_equals_peft(options: dict) -> None:
    """Kernel 1: PEFT's unmerged OFT conv is right (a channel rotation), with stride, padding and groups."""
    model, x = make(1, **options)
    block = 2 if options.get("groups") else 4
    p, q_peft, m, q = oft_pair(model, x, b=block)
    ours, peft_out = run(m, [q], x), run(p, [q_peft], x)
    for a, b in zip((ours[0], *ours[1]), (peft_out[0], *peft_out[1])):
        assert_close(a, b)


@pytest.mark.parametrize("options", [dict(kernel=3, padding=1), dict(kernel=3, stride=2, padding=1),
                                     dict(kernel=3, dilation=2, padding=2), dict(kernel=3, groups=2, padding=1),
                                     dict(kernel=(3, 2), stride=(2, 1))])
@pytest.mark.parametrize("terms", [4, 0])
def test_oft_conv_equals_reference(options: dict, terms: int) -> None:
    """Kernel > 1 (where PEFT's unmerged path is wrong): against the dense reference, outputs and gradients."""
    options = dict(options)
    model, x = make(options.pop("kernel"), **options)
    m = compiled(model, x, f"oftv2(block_size=3, neumann_terms={terms}, targets='conv')")
    q = m.graph_module.get_parameter("conv.oftv2_q")
    with torch.no_grad():
        q.copy_(0.2 * torch.randn(q.shape, generator=torch.Generator().manual_seed(4)))
    ref_q = q.detach().clone().requires_grad_()
    ours, reference = run(m, [q], x), run(oft_reference(model.conv, ref_q, 3, terms), [ref_q], x)
    for a, b in zip((ours[0], *ours[1]), (reference[0], *reference[1])):
        assert_close(a, b)


def test_oft_3x3_conv_equals_peft_merged_not_peft_unmerged() -> None:
    """With PEFT's own parameters, ours equals PEFT's merged layer; PEFT's unmerged forward is not the base
    conv at R = I (the fold of overlapping patches), while ours is."""
    model, x = make(3, stride=2, padding=1)
    p, _, m, q = oft_pair(model, x)
    with torch.no_grad():
        unmerged = p(x)
        merged = copy.deepcopy(p).merge_and_unload()(x)
        assert_close(m(x), merged)
        assert (unmerged - merged).abs().max().item() > 1e-1
        identity = peft.get_peft_model(copy.deepcopy(model), peft.OFTConfig(r=0, oft_block_size=4,
                                                                            target_modules=["conv"]))
        q.zero_()
        assert_close(m(x), model(x))
        assert (identity(x) - model(x)).abs().max().item() > 1e-1


@pytest.mark.parametrize("spec", ["hra(r=4, targets='conv')", "oftv2(block_size=3, targets='conv')",
                                  "oftv2(block_size=3, neumann_terms=0, targets='conv')"])
def test_conv_export_merged_and_unmerged(spec: str, tmp_path) -> None:
    """merge=True leaves a plain conv with the folded weight; merge=False keeps the adapter; both run in
    onnxruntime to the adapter model's outputs, on a batch size other than the example's."""
    model, x = make(3, stride=2, padding=1, groups=2)
    m = compiled(model, x, spec)
    for p in m.graph_module.parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.copy_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    x2 = torch.randn(3, *x.shape[1:])
    with torch.no_grad():
        expected = m.eval()(x2)
    merged = m.export_graph(merge=True)
    assert not [n for n, _ in merged.named_parameters() if "hra_u" in n or "oftv2_q" in n]
    assert [n.target for n in merged.graph.nodes if n.op == "call_function"] == [torch.ops.aten.conv2d.default]
    with torch.no_grad():
        assert_close(merged(x2), expected)
    for merge in (True, False):
        report = graphopt.export(m, tmp_path / f"conv_{merge}.onnx", example_inputs=(x2,), merge=merge, atol=1e-5)
        assert report.max_abs_diff <= 1e-5


def test_conv_training_step_moves_only_the_adapter() -> None:
    model, x = make(3, padding=1)
    m = graphopt.compile(model, methods=["oftv2(block_size=4, targets='conv')", "sgd(lr=0.5)"],
                         loss_fn=F.mse_loss, backend="eager", example_inputs=(x,))
    target = torch.randn_like(model(x))
    before = {n: p.detach().clone() for n, p in m.graph_module.named_parameters()}
    losses = [m.step(x, target).item() for _ in range(3)]
    assert losses[-1] < losses[0]
    changed = {n for n, p in m.graph_module.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"conv.oftv2_q"}
    assert {n for n, p in m.graph_module.named_parameters() if p.requires_grad} == {"conv.oftv2_q"}


def test_oft_conv_block_size_must_divide_the_group_filter() -> None:
    model, x = make(3, groups=2, padding=1)   # filter of a group: 2·3·3 = 18 values
    with pytest.raises(graphopt.OptionError, match="block_size=4 does not divide in_features=18 of layer 'conv'"):
        compiled(model, x, "oftv2(block_size=4, targets='conv')")
