"""HRA (Yuan et al. 2024) against an independent dense formula: ``W′ = W H_1⋯H_r``, ``H_i = I − 2ûᵢûᵢᵀ``."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
import graphopt.builtin.hra as hra_module
from graphopt.builtin.hra import hra_linear, hra_matrix, hra_transform


# -- independent reference (plain PyTorch, from the paper's formula) ----------------------------------
def dense_reflections(u: torch.Tensor) -> torch.Tensor:
    """``R = H_1 H_2 ⋯ H_r`` with ``H_i = I − 2 û_i û_iᵀ``, built as explicit d×d products."""
    d = u.shape[0]
    eye = torch.eye(d, dtype=u.dtype)
    rot = eye
    for i in range(u.shape[1]):
        unit = u[:, i] / u[:, i].norm()
        rot = rot @ (eye - 2 * torch.outer(unit, unit))
    return rot


def dense_gs(u: torch.Tensor) -> torch.Tensor:
    """``I − 2QQᵀ`` with ``Q`` from a QR factorisation (same nested spans as Gram–Schmidt; signs cancel)."""
    q, _ = torch.linalg.qr(u)
    return torch.eye(u.shape[0], dtype=u.dtype) - 2 * q @ q.t()


class Conv1D(nn.Module):
    """transformers' Conv1D: ``addmm(b, x, W)`` with ``W`` stored ``(in, out)``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.reshape(*x.shape[:-1], self.nf)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.proj = Conv1D(8, 10)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(F.gelu(self.fc1(x)))))


def reference_forward(model: Net, us: dict[str, torch.Tensor], x: torch.Tensor, gs: bool = False) -> torch.Tensor:
    """The net with every adapted weight replaced by ``W R`` (``W`` in (out, in) layout)."""
    rot = dense_gs if gs else dense_reflections

    def weight(path: str, w_out_in: torch.Tensor) -> torch.Tensor:
        return w_out_in @ rot(us[path]) if path in us else w_out_in

    h = F.gelu(F.linear(x, weight("fc1", model.fc1.weight), model.fc1.bias))
    h = torch.tanh(F.linear(h, weight("proj", model.proj.weight.t()), model.proj.bias))
    return F.linear(h, weight("head", model.head.weight), model.head.bias)


def randomise(m: graphopt.CompiledModel, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random (unpaired) adapter values; returns {layer path: u}."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for name, p in m.trainable_parameters().items():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
            out[name.rpartition(".")[0]] = p.detach().clone()
    return out


def make(dtype: torch.dtype = torch.float64, spec: str = "hra(r=4)", extra: tuple[str, ...] = ("sgd(lr=0.1)",),
         backend: str = "eager", loss_fn=F.mse_loss):
    torch.manual_seed(0)
    model = Net().to(dtype)
    x = torch.randn(3, 5, 6, dtype=dtype)
    m = graphopt.compile(model, methods=[spec, *extra], loss_fn=loss_fn, example_inputs=(x,), backend=backend)
    return model, m, x


# -- the math ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("r", [2, 4, 6, 8, 10])
def test_wy_form_equals_dense_product_and_is_orthogonal(r: int) -> None:
    u = torch.randn(12, r, dtype=torch.float64)
    rot = hra_matrix(u)
    torch.testing.assert_close(rot, dense_reflections(u), atol=1e-12, rtol=0)
    torch.testing.assert_close(rot.t() @ rot, torch.eye(12, dtype=torch.float64), atol=1e-12, rtol=0)
    x = torch.randn(7, 12, dtype=torch.float64)
    torch.testing.assert_close(hra_transform(x, u), x @ dense_reflections(u).t(), atol=1e-12, rtol=0)


def test_gram_schmidt_form() -> None:
    u = torch.randn(9, 4, dtype=torch.float64)
    rot = hra_matrix(u, apply_gs=True)
    torch.testing.assert_close(rot, dense_gs(u), atol=1e-12, rtol=0)
    torch.testing.assert_close(rot.t() @ rot, torch.eye(9, dtype=torch.float64), atol=1e-12, rtol=0)


def test_gradcheck_small_shapes() -> None:
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    u = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: hra_transform(a, b), (x, u))
    assert torch.autograd.gradcheck(lambda a, b: hra_transform(a, b, apply_gs=True), (x, u))


# -- the rewritten model ------------------------------------------------------------------------------
def test_parameters_names_shapes_and_frozen_base() -> None:
    _, m, _ = make(spec="hra(r=4)")
    shapes = {n: tuple(p.shape) for n, p in m.trainable_parameters().items()}
    assert shapes == {"fc1.hra_u": (6, 4), "proj.hra_u": (10, 4), "head.hra_u": (8, 4)}
    frozen = {n for n, p in m.graph_module.named_parameters() if not p.requires_grad}
    assert {"fc1.weight", "fc1.bias", "proj.weight", "proj.bias", "head.weight", "head.bias"} <= frozen
    # targets select layers by glob; the others keep no adapter
    _, m2, _ = make(spec="hra(r=2, targets=['fc1', 'pro*'])")
    assert [n for n, _ in m2.trainable_parameters().items()] == ["fc1.hra_u", "proj.hra_u"]


def test_identity_at_init_float32() -> None:
    model, m, x = make(torch.float32, spec="hra(r=4)")
    for _, p in m.trainable_parameters().items():
        torch.testing.assert_close(p[:, 0::2], p[:, 1::2], atol=0, rtol=0)  # equal adjacent pairs
        assert p.norm(dim=0).min() > 0
    assert (m(x) - model(x)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("gs", [False, True])
def test_output_and_gradients_match_dense_formula_float64(gs: bool) -> None:
    model, m, x = make(torch.float64, spec=f"hra(r=4, apply_gs={gs})")
    us = randomise(m)
    ref_us = {k: v.clone().requires_grad_(True) for k, v in us.items()}
    x_ref = x.clone().requires_grad_(True)
    x_go = x.clone().requires_grad_(True)
    probe = torch.randn(3, 5, 3, dtype=torch.float64)
    y = m(x_go)
    y_ref = reference_forward(model, ref_us, x_ref, gs)
    assert (y - y_ref).abs().max().item() <= 1e-10
    (y * probe).sum().backward()
    (y_ref * probe).sum().backward()
    for name, p in m.trainable_parameters().items():
        ref = ref_us[name.rpartition(".")[0]].grad
        assert (p.grad - ref).abs().max().item() <= 1e-10 * max(1.0, ref.abs().max().item())
    assert (x_go.grad - x_ref.grad).abs().max().item() <= 1e-10


def test_output_and_gradients_match_dense_formula_float32() -> None:
    model, m, x = make(torch.float32, spec="hra(r=4)")
    us = randomise(m)
    ref_us = {k: v.double().requires_grad_(True) for k, v in us.items()}
    y = m(x)
    y_ref = reference_forward(model.double(), ref_us, x.double())
    assert (y.double() - y_ref).abs().max().item() <= 1e-5
    probe = torch.randn(3, 5, 3)
    (y * probe).sum().backward()
    (y_ref * probe.double()).sum().backward()
    for name, p in m.trainable_parameters().items():
        ref = ref_us[name.rpartition(".")[0]].grad
        assert (p.grad.double() - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def _reference_sgd_step(model: Net, us: dict[str, torch.Tensor], x: torch.Tensor, target: torch.Tensor, lr: float,
                        reg_lambda: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    leaves = {k: v.clone().requires_grad_(True) for k, v in us.items()}
    loss = F.mse_loss(reference_forward(model, leaves, x), target)
    for u in leaves.values():
        unit = u / u.norm(dim=0)
        eye = torch.eye(u.shape[1], dtype=u.dtype)
        loss = loss + reg_lambda * torch.sqrt(((eye - unit.t() @ unit) ** 2).sum())
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss.detach(), {k: v - lr * g for (k, v), g in zip(us.items(), grads)}


@pytest.mark.parametrize("reg_lambda", [0.0, 0.3])
def test_training_step_matches_reference(reg_lambda: float) -> None:
    model, m, x = make(torch.float64, spec=f"hra(r=4, reg_lambda={reg_lambda})", extra=("sgd(lr=0.05)",))
    before = copy.deepcopy(model.state_dict())
    us = randomise(m)
    base = {n: p.detach().clone() for n, p in m.graph_module.named_parameters() if not p.requires_grad}
    target = torch.randn(3, 5, 3, dtype=torch.float64)
    for _ in range(2):
        ref_loss, us = _reference_sgd_step(model, us, x, target, 0.05, reg_lambda)
        loss = m.step(x, target)
        assert abs(loss.item() - ref_loss.item()) <= 1e-10
    for name, p in m.trainable_parameters().items():
        torch.testing.assert_close(p.detach(), us[name.rpartition(".")[0]], atol=1e-10, rtol=0)
    for name, p in m.graph_module.named_parameters():  # base weights frozen: unchanged by the step
        if not p.requires_grad:
            assert torch.equal(p, base[name])
    # the user's model is untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any("hra" in n for n, _ in model.named_parameters())


def test_inductor_step_matches_eager() -> None:
    runs = []
    for backend in ("eager", "inductor"):
        _, m, x = make(torch.float32, spec="hra(r=4)", backend=backend)
        randomise(m)
        target = torch.randn(3, 5, 3, generator=torch.Generator().manual_seed(3))
        losses = [m.step(x, target).item() for _ in range(2)]
        runs.append((losses, {n: p.detach().clone() for n, p in m.trainable_parameters().items()}))
    (loss_e, p_e), (loss_i, p_i) = runs
    assert np.allclose(loss_e, loss_i, atol=1e-5, rtol=0)
    for name in p_e:
        torch.testing.assert_close(p_i[name], p_e[name], atol=1e-5, rtol=0)


# -- export ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gs", [False, True])
def test_export_merged_and_unmerged_onnx(tmp_path, gs: bool) -> None:
    import onnxruntime

    model, m, x = make(torch.float32, spec=f"hra(r=4, apply_gs={gs})")
    us = randomise(m)
    x_new = torch.randn(4, 5, 6)  # another batch size: the batch dim is dynamic
    expected = reference_forward(model.double(), {k: v.double() for k, v in us.items()}, x_new.double(), gs)
    with torch.no_grad():
        adapter_out = m.eval()(x_new)
    assert (adapter_out.double() - expected).abs().max().item() <= 1e-5
    for merge in (True, False):
        path = tmp_path / f"hra_{merge}.onnx"
        report = graphopt.export(m, path, example_inputs=(x,), merge=merge, atol=1e-5)
        assert report.max_abs_diff <= 1e-5
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (out,) = session.run(None, {session.get_inputs()[0].name: x_new.numpy()})
        assert np.abs(out - adapter_out.numpy()).max() <= 1e-5
    merged = m.export_graph(merge=True)
    assert not any(n.target is hra_transform for n in merged.graph.nodes)
    assert not any("hra_u" in n for n, _ in merged.named_parameters())
    unmerged = m.export_graph(merge=False)
    assert sum(n.target is hra_transform for n in unmerged.graph.nodes) == 3


# -- errors and composition -------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, words", [
    ("hra(r=3)", ["'hra'", "r=3", "even", "r=4"]),
    ("hra(r=0)", ["'hra'", "r=0", "even", "r=2"]),
    ("hra(reg_lambda=-1.0)", ["'hra'", "reg_lambda"]),
])
def test_option_errors(spec: str, words: list[str]) -> None:
    with pytest.raises(graphopt.OptionError) as info:
        graphopt.compile(Net(), methods=[spec])
    assert all(w in str(info.value) for w in words), str(info.value)


def test_layer_errors() -> None:
    x = torch.randn(2, 6)
    with pytest.raises(graphopt.OptionError, match=r"matches no linear or conv2d layer.*fc1, head, proj"):
        graphopt.compile(Net(), methods=["hra(targets='nope*')"], example_inputs=(x,), backend="eager")
    with pytest.raises(graphopt.OptionError, match=r"r=8 is larger than in_features=6 of layer 'fc1'"):
        graphopt.compile(Net(), methods=["hra(r=8)"], example_inputs=(x,), backend="eager")
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    # explicit targets reach Conv2d layers too (tests/test_peft_conv.py); default targets: only linear layers
    m = graphopt.compile(conv, methods=["hra(r=2, targets='*')"], example_inputs=(torch.randn(1, 3, 6, 6),),
                         backend="eager")
    assert [n for n, _ in m.trainable_parameters().items()] == ["0.hra_u", "2.hra_u"]
    m = graphopt.compile(conv, methods=["hra(r=2)"], example_inputs=(torch.randn(1, 3, 6, 6),), backend="eager")
    assert [n for n, _ in m.trainable_parameters().items()] == ["2.hra_u"]
    with pytest.raises(graphopt.OptionError, match="listed twice"):
        graphopt.compile(Net(), methods=["hra", "hra(r=2)"])


def test_composes_with_tract() -> None:
    if "tract" not in graphopt.list_methods():
        pytest.skip("tract is not registered")
    model, m, x = make(torch.float64, spec="hra(r=4, targets='head')", extra=("tract(layer='fc1')", "sgd(lr=0.05)"))
    us = randomise(m)
    target = torch.randn(3, 5, 3, dtype=torch.float64)
    ref_loss, ref_us = _reference_sgd_step(model, us, x, target, 0.05)
    assert abs(m.step(x, target).item() - ref_loss.item()) <= 1e-10
    torch.testing.assert_close(m.graph_module.head.hra_u.detach(), ref_us["head"], atol=1e-10, rtol=0)


def test_composes_with_oftv2_on_other_layers() -> None:
    if "oftv2" not in graphopt.list_methods():
        pytest.skip("oftv2 is not registered")
    model, m, x = make(torch.float64, spec="hra(r=4, targets=['fc1', 'proj'])",
                       extra=("oftv2(block_size=4, targets='head')", "sgd(lr=0.05)"))
    names = [n for n, _ in m.trainable_parameters().items()]
    assert names == ["fc1.hra_u", "proj.hra_u", "head.oftv2_q"]
    us = randomise(m)  # oftv2_q at zero → identity rotation for head; set hra only
    with torch.no_grad():
        m.graph_module.head.oftv2_q.zero_()
    us.pop("head")
    y = m(x)
    assert (y - reference_forward(model, us, x)).abs().max().item() <= 1e-10
    target = torch.randn(3, 5, 3, dtype=torch.float64)
    m.step(x, target)
    assert m.graph_module.head.oftv2_q.abs().max() > 0  # both adapters train


# -- the training form: the input transform and its linear layer as one autograd function ----------------------
@pytest.mark.parametrize("apply_gs", [False, True])
def test_hra_linear_equals_the_transform_then_the_layer(apply_gs: bool) -> None:
    """``hra_linear`` (the step's fused form) against ``F.linear(hra_transform(x, u), W, b)``: values and
    gradients, gradcheck in float64 for the input, the factors and (when they train) the weight and bias."""
    gen = torch.Generator().manual_seed(7)
    x, w, b, u = (torch.randn(*s, dtype=torch.float64, generator=gen, requires_grad=True)
                  for s in ((3, 5, 12), (7, 12), (7,), (12, 4)))
    fused = hra_linear(x, w, b, u, apply_gs=apply_gs)
    plain = F.linear(hra_transform(x, u, apply_gs=apply_gs), w, b)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-12)
    for got, want in zip(torch.autograd.grad(fused.sin().sum(), (x, w, b, u)),
                         torch.autograd.grad(plain.sin().sum(), (x, w, b, u))):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, w, b, u: hra_linear(x, w, b, u, apply_gs=apply_gs), (x, w, b, u))
    assert torch.autograd.gradcheck(lambda x, u: hra_linear(x, w.detach(), None, u, apply_gs=apply_gs), (x, u))


def test_hra_linear_under_autocast_matches_the_transform_then_the_layer() -> None:
    """bf16 autocast: the products run in bfloat16 as ``F.linear`` would, and the gradients come back in the
    inputs' float32."""
    gen = torch.Generator().manual_seed(8)
    x, w, b, u = (torch.randn(*s, generator=gen, requires_grad=True) for s in ((4, 64), (32, 64), (32,), (64, 8)))
    results = []
    for fn in (lambda: hra_linear(x, w, b, u), lambda: F.linear(hra_transform(x, u), w, b)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn()
        grads = torch.autograd.grad(y.float().square().sum(), (x, u))
        results.append((y, grads))
    (fused, fused_grads), (plain, plain_grads) = results
    assert fused.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), plain.float(), rtol=0.05, atol=0.05)
    for got, want in zip(fused_grads, plain_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * want.abs().max().item())


def test_the_step_trains_the_fused_form_and_exports_the_transform(mlp, monkeypatch) -> None:
    """The training pass swaps every transform-and-linear pair in the step's graph only: the step traces one
    fused call per adapted layer, the export graph keeps ``hra_transform``, and training moves the adapters."""
    calls = []
    original = hra_module.reflected_linear
    monkeypatch.setattr(hra_module, "reflected_linear", lambda *args: calls.append(1) or original(*args))
    x = torch.randn(6, 8)
    m = graphopt.compile(mlp, methods=["hra(r=2)", "adamw(lr=1e-2)"], loss_fn=F.cross_entropy, backend="eager",
                         example_inputs=(x,))
    before = {n: p.clone() for n, p in m.trainable_parameters().items()}
    m.step(x, torch.randint(0, 4, (6,)))
    transforms = sum(n.target is hra_transform for n in m.export_graph(False).graph.nodes)
    assert transforms == len(before) > 0 and len(calls) == transforms  # traced once, one call per layer
    assert all(not torch.equal(before[n], p) for n, p in m.trainable_parameters().items())


def test_hra_linear_output_can_be_written_in_place() -> None:
    """Models write into a linear layer's output (Falcon): the fused form's output is not a view."""
    gen = torch.Generator().manual_seed(9)
    x, w, u = (torch.randn(*s, generator=gen, requires_grad=True) for s in ((2, 3, 8), (6, 8), (8, 2)))
    y = hra_linear(x, w.detach(), None, u)
    y.mul_(2)
    y.sum().backward()
    assert u.grad is not None and x.grad is not None
