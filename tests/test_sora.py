"""SoRA (Ding et al. 2023): gated LoRA forward and gradients against a plain PyTorch gated LoRA, the
proximal gate step against the closed-form soft-threshold, the sparsity schedule, pruning and export."""

from __future__ import annotations

import copy
import math

import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.builtin.sora import lambda_at

LAYERS = ("encoder.0", "encoder.2", "head")


# -- an independent reference: gated LoRA written from the paper's formula -----------------------------
class GatedLoRA(nn.Module):
    """``y = base(x) + (alpha/r)·((x Aᵀ) ⊙ g) Bᵀ`` around a frozen ``nn.Linear``."""

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, gate: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.A, self.B, self.gate = (nn.Parameter(t.detach().clone()) for t in (A, B, gate))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = torch.einsum("...i,ri->...r", x, self.A) * self.gate
        return self.base(x) + self.scale * torch.einsum("...r,or->...o", low, self.B)


def reference_of(mlp: nn.Module, m: graphopt.CompiledModel, scale: float) -> nn.Module:
    """A copy of ``mlp`` whose linear layers are GatedLoRA with ``m``'s current adapter values."""
    import copy

    ref = copy.deepcopy(mlp)
    params = dict(m.graph_module.named_parameters())
    for path in LAYERS:
        owner, _, attr = path.rpartition(".")
        parent = ref.get_submodule(owner) if owner else ref
        base = getattr(parent, attr)
        setattr(parent, attr, GatedLoRA(base, params[f"{path}.sora_A"], params[f"{path}.sora_B"],
                                        params[f"{path}.sora_gate"], scale))
    return ref


def soft_threshold_ref(v: torch.Tensor, t: float) -> torch.Tensor:
    """Closed form, written case by case: v − t if v > t, v + t if v < −t, else 0."""
    return torch.where(v > t, v - t, torch.where(v < -t, v + t, torch.zeros_like(v)))


def compiled(mlp: nn.Module, sora: str, opt: str = "sgd(lr=0.1)", x: torch.Tensor | None = None,
             loss_fn=F.cross_entropy, backend: str = "eager") -> graphopt.CompiledModel:
    x = torch.randn(5, 8, dtype=next(mlp.parameters()).dtype) if x is None else x
    return graphopt.compile(mlp, methods=[sora, opt], loss_fn=loss_fn, example_inputs=(x,), backend=backend)


def randomise(m: graphopt.CompiledModel, seed: int = 0, gates: dict[str, list[float]] | None = None) -> None:
    """Give A, B and the gates random (or given) values, so every gradient is non-zero."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(m.graph_module.named_parameters())
    with torch.no_grad():
        for path in LAYERS:
            for name in ("sora_A", "sora_B", "sora_gate"):
                p = params[f"{path}.{name}"]
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
            if gates and path in gates:
                params[f"{path}.sora_gate"].copy_(torch.tensor(gates[path], dtype=p.dtype))


@pytest.fixture
def mlp64(mlp):
    return mlp.double()


# -- forward and gradients --------------------------------------------------------------------------------
def test_parameters_names_shapes_and_init(mlp) -> None:
    torch.manual_seed(3)
    m = compiled(mlp, "sora(r=4, alpha=8)")
    params = m.trainable_parameters()
    assert sorted(params) == sorted(f"{p}.sora_{n}" for p in LAYERS for n in ("A", "B", "gate"))
    for path, (d_in, d_out) in zip(LAYERS, [(8, 16), (16, 16), (16, 4)]):
        A, B, g = (params[f"{path}.sora_{n}"] for n in ("A", "B", "gate"))
        assert A.shape == (4, d_in) and B.shape == (d_out, 4) and g.shape == (4,)
        assert torch.equal(B, torch.zeros_like(B)) and torch.equal(g, torch.ones_like(g))
        bound = 1 / math.sqrt(d_in)  # kaiming_uniform(a=√5): U(−1/√in, 1/√in)
        assert A.abs().max() <= bound and A.abs().max() > 0.5 * bound and A.std() > 0.2 * bound
    base = {n for n, _ in m.graph_module.named_parameters()} - set(params)
    assert base == {f"{p}.{w}" for p in LAYERS for w in ("weight", "bias")}  # frozen, not trainable
    x = torch.randn(3, 8)
    torch.testing.assert_close(m(x), mlp(x), rtol=0, atol=0)  # B = 0: the model is unchanged at init


def test_forward_and_gradients_match_plain_gated_lora(mlp64) -> None:
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    m = compiled(mlp64, "sora(r=3, alpha=5)", x=x)
    randomise(m, gates={"encoder.0": [0.7, 0.0, -1.3]})
    ref = reference_of(mlp64, m, scale=5 / 3)
    y, y_ref = m(x), ref(x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-13)
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    (y_ref * weights).sum().backward()
    params = m.trainable_parameters()
    ref_params = dict(ref.named_parameters())
    for path in LAYERS:
        for name, ref_name in (("sora_A", "A"), ("sora_B", "B"), ("sora_gate", "gate")):
            grad, expected = params[f"{path}.{name}"].grad, ref_params[f"{path}.{ref_name}"].grad
            assert expected.abs().max() > 0
            torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


def test_conv1d_addmm_layers_are_adapted() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    net = nn.Sequential(Conv1D(12, 6), nn.ReLU(), Conv1D(3, 12)).double()  # Conv1D(nf=out, nx=in), W (in, out)
    x = torch.randn(4, 6, dtype=torch.float64)
    m = graphopt.compile(net, methods=["sora(r=2, alpha=4)", "sgd(lr=0.1)"], loss_fn=F.cross_entropy,
                         example_inputs=(x,), backend="eager")
    params = m.trainable_parameters()
    assert params["0.sora_A"].shape == (2, 6) and params["0.sora_B"].shape == (12, 2)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params.values():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    h = x @ net[0].weight + net[0].bias
    h = h + 2 * ((x @ params["0.sora_A"].T) * params["0.sora_gate"]) @ params["0.sora_B"].T
    h = torch.relu(h)
    y = h @ net[2].weight + net[2].bias
    y = y + 2 * ((h @ params["2.sora_A"].T) * params["2.sora_gate"]) @ params["2.sora_B"].T
    torch.testing.assert_close(m(x), y, rtol=0, atol=1e-13)


# -- the proximal gate step ---------------------------------------------------------------------------------
def _reference_step(ref: nn.Module, x: torch.Tensor, t: torch.Tensor, lr: float, threshold: float) -> dict:
    """One SGD step on the reference, then the closed-form soft-threshold on every gate."""
    loss = F.cross_entropy(ref(x), t)
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [dict(ref.named_parameters())[n] for n in names])
    out = {}
    for name, grad in zip(names, grads):
        updated = dict(ref.named_parameters())[name].detach() - lr * grad
        out[name] = soft_threshold_ref(updated, threshold) if name.endswith(".gate") else updated
    return out, dict(zip(names, grads))


def _ref_name(name: str) -> str:
    path, _, attr = name.rpartition(".")
    return f"{path}.{attr.removeprefix('sora_')}"


def test_proximal_step_is_the_soft_threshold_after_sgd(mlp64) -> None:
    lr, xi = 0.1, 0.5  # threshold lr·ξ = 0.05
    gates = {"encoder.0": [0.8, -0.6, 0.03, -0.02], "encoder.2": [0.04, -1.0, 0.0, 0.3],
             "head": [-0.01, 0.5, 0.06, -0.07]}
    m = compiled(mlp64, f"sora(r=4, alpha=4, sparse_lambda={xi})", f"sgd(lr={lr})")
    randomise(m, seed=1, gates=gates)
    with torch.no_grad():  # small B and A keep the gradient step below the threshold's size
        for name, p in m.trainable_parameters().items():
            if not name.endswith("gate"):
                p.mul_(0.2)
    ref = reference_of(mlp64, m, scale=1.0)
    x, t = torch.randn(6, 8, dtype=torch.float64), torch.randint(0, 4, (6,))
    expected, _ = _reference_step(ref, x, t, lr, lr * xi)
    m.step(x, t)
    params = m.trainable_parameters()
    zeros = 0
    for name, value in params.items():
        torch.testing.assert_close(value.detach(), expected[_ref_name(name)], rtol=0, atol=1e-14)
        if name.endswith("gate"):
            zeros += int((value == 0).sum())
    assert 0 < zeros < 12  # the hand-made values land on both sides of the threshold


def test_zero_gates_stay_zero_unless_the_gradient_step_exceeds_the_threshold(mlp64) -> None:
    lr = 0.1
    gates = {"encoder.0": [0.0, 1.0, 0.0], "encoder.2": [0.5, 0.0, -0.5], "head": [1.0, -1.0, 0.0]}
    x, t = torch.randn(6, 8, dtype=torch.float64), torch.randint(0, 4, (6,))
    probe = compiled(mlp64, "sora(r=3, alpha=3)", f"sgd(lr={lr})")
    randomise(probe, seed=2, gates=gates)
    _, grads = _reference_step(reference_of(mlp64, probe, scale=1.0), x, t, lr, 0.0)
    at_zero = torch.cat([grads[f"{p}.gate"][torch.tensor(g) == 0] for p, g in gates.items()]).abs()
    assert at_zero.min() > 0  # the gradient at a zero gate is not zero: only the threshold holds it
    for xi, stay in ((1.01 * at_zero.max().item(), True), (0.99 * at_zero.min().item(), False)):
        m = compiled(mlp64, f"sora(r=3, alpha=3, sparse_lambda={xi})", f"sgd(lr={lr})")
        randomise(m, seed=2, gates=gates)
        expected, _ = _reference_step(reference_of(mlp64, m, scale=1.0), x, t, lr, lr * xi)
        m.step(x, t)
        params = m.trainable_parameters()
        for path, g in gates.items():
            gate = params[f"{path}.sora_gate"].detach()
            was_zero = torch.tensor(g) == 0
            torch.testing.assert_close(gate, expected[f"{path}.gate"], rtol=0, atol=1e-14)
            if stay:
                assert torch.all(gate[was_zero] == 0)  # exactly zero
            else:
                assert torch.all(gate[was_zero] != 0)  # moved out by a gradient step larger than lr·ξ


def test_sparsity_grows_with_lambda(mlp) -> None:
    gen = torch.Generator().manual_seed(4)
    data = [(torch.randn(16, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen)) for _ in range(4)]
    active = []
    for xi in (0.0, 0.1, 0.3, 0.6):
        m = compiled(mlp, f"sora(r=6, sparse_lambda={xi})", "sgd(lr=0.1, momentum=0.9)", x=data[0][0])
        randomise(m, seed=5)  # gates of different sizes reach zero at different ξ
        with torch.no_grad():
            for name, p in m.trainable_parameters().items():
                if not name.endswith("gate"):
                    p.mul_(0.3)
        for _ in range(5):
            for x, t in data:
                m.step(x, t)
        ranks = m.sora_ranks()
        assert set(ranks) == set(LAYERS) and all(r == 6 for _, r in ranks.values())
        gates = torch.cat([p.detach() for n, p in m.trainable_parameters().items() if n.endswith("gate")])
        assert sum(a for a, _ in ranks.values()) == int((gates != 0).sum())
        active.append(sum(a for a, _ in ranks.values()))
    assert active[0] == 18 and active[-1] < active[2] < active[1] < 18, active


# -- the sparsifying schedule ------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "log-linear", "exp"])
def test_schedule_values(schedule: str) -> None:
    lo, hi, n = 1e-3, 1e-1, 10
    for step in (1, 2, 6, 11, 50):
        p = min((step - 1) / n, 1.0)
        expected = {"linear": lo + p * (hi - lo),
                    "log-linear": math.exp(math.log(lo) + p * (math.log(hi) - math.log(lo))),
                    "exp": lo + (hi - lo) * (1 - math.exp(-5 * p)) / (1 - math.exp(-5))}[schedule]
        assert lambda_at(step, lo, schedule, hi, n) == pytest.approx(expected, rel=1e-12)
    assert lambda_at(1, lo, schedule, hi, n) == pytest.approx(lo) and lambda_at(11, lo, schedule, hi, n) == hi


def test_scheduled_lambda_reaches_the_step_graph_without_recompiling(mlp64) -> None:
    lr, lo, hi, n = 0.01, 1.0, 5.0, 4
    zero_loss = lambda y, t: (y * 0).sum()  # noqa: E731 - no gradient: the gate moves by the threshold only
    m = compiled(mlp64, f"sora(r=2, sparse_lambda={lo}, lambda_schedule='linear', max_lambda={hi}, lambda_steps={n})",
                 f"sgd(lr={lr})", loss_fn=zero_loss)
    x = torch.randn(3, 8, dtype=torch.float64)
    gate = 1.0
    for step in range(1, 7):
        m.step(x, None)
        gate -= lr * (lo + min((step - 1) / n, 1) * (hi - lo))
        for path in LAYERS:
            torch.testing.assert_close(m.trainable_parameters()[f"{path}.sora_gate"].detach(),
                                       torch.full((2,), gate, dtype=torch.float64), rtol=0, atol=1e-14)
    assert m.compile_stats().traces == 1


# -- errors ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("spec", "match"), [
    ("sora(r=0)", r"'sora'.*option r=0.*r >= 1"),
    ("sora(alpha=0)", r"'sora'.*option alpha=0.*alpha > 0"),
    ("sora(alpha=-2.0)", r"'sora'.*option alpha=-2.0.*alpha > 0"),
    ("sora(sparse_lambda=-1e-3)", r"'sora'.*sparse_lambda=-0.001.*>= 0"),
    ("sora(lambda_schedule='cosine', max_lambda=1.0, lambda_steps=10)", r"'sora'.*lambda_schedule='cosine'.*'linear'"),
    ("sora(sparse_lambda=0.1, lambda_schedule='linear', max_lambda=0.01, lambda_steps=10)",
     r"'sora'.*max_lambda=0.01.*max_lambda >= sparse_lambda"),
    ("sora(lambda_schedule='linear', lambda_steps=10)", r"'sora'.*max_lambda=None"),
    ("sora(lambda_schedule='exp', max_lambda=1.0)", r"'sora'.*lambda_steps=None.*>= 1"),
    ("sora(lambda_schedule='exp', max_lambda=1.0, lambda_steps=0)", r"'sora'.*lambda_steps=0"),
    ("sora(sparse_lambda=0, lambda_schedule='log-linear', max_lambda=1.0, lambda_steps=5)",
     r"'sora'.*'log-linear' schedule needs sparse_lambda > 0"),
    ("sora(max_lambda=1.0)", r"'sora'.*max_lambda.*only used with a lambda_schedule"),
    ("sora(r=2.5)", r"'sora'.*option 'r' must be int"),
])
def test_option_errors(mlp, spec: str, match: str) -> None:
    with pytest.raises(graphopt.OptionError, match=match):
        graphopt.compile(mlp, methods=[spec])


def test_targets_matching_nothing(mlp) -> None:
    with pytest.raises(graphopt.OptionError, match=r"'sora'.*'decoder\.\*' matches no linear layer.*encoder\.0"):
        graphopt.compile(mlp, methods=["sora(targets=['head', 'decoder.*'])"], example_inputs=(torch.randn(2, 8),))


def test_targets_select_layers(mlp) -> None:
    m = graphopt.compile(mlp, methods=["sora(targets='encoder.*')"], example_inputs=(torch.randn(2, 8),))
    assert set(m.sora_ranks()) == {"encoder.0", "encoder.2"}


# -- pruning and export ------------------------------------------------------------------------------------
PRUNE_GATES = {"encoder.0": [0.0, 0.7, 0.0, -1.2, 0.4], "encoder.2": [0.0] * 5, "head": [0.3, -0.2, 1.1, 0.5, 0.9]}


def test_prune_keeps_outputs_and_shrinks_ranks(mlp, tmp_path) -> None:
    x, t = torch.randn(6, 8), torch.randint(0, 4, (6,))
    m = compiled(mlp, "sora(r=5, alpha=10, sparse_lambda=0.0)", "sgd(lr=0.05, momentum=0.9)", x=x)
    randomise(m, seed=6)
    m.step(x, t)  # creates momentum buffers
    randomise(m, seed=7, gates=PRUNE_GATES)
    before = m.trainable_parameters()
    buffers = {n: s["momentum_buffer"].clone() for n, s in m.optimizer_state().items()}
    y_before = m(x).detach()
    y_before64 = copy.deepcopy(m.graph_module).double()(x.double())
    assert m.sora_ranks() == {"encoder.0": (3, 5), "encoder.2": (0, 5), "head": (5, 5)}

    assert m.prune() is m  # in place; returns the model for chaining
    params = m.trainable_parameters()
    keep = torch.tensor([1, 3, 4])
    assert params["encoder.0.sora_A"].shape == (3, 8) and params["encoder.0.sora_B"].shape == (16, 3)
    assert params["encoder.0.sora_gate"].shape == (3,) and params["head.sora_A"].shape == (5, 16)
    assert not any(n.startswith("encoder.2.") for n in params)  # no active rank: the branch is gone
    torch.testing.assert_close(params["encoder.0.sora_A"], before["encoder.0.sora_A"][keep], rtol=0, atol=0)
    torch.testing.assert_close(params["encoder.0.sora_B"], before["encoder.0.sora_B"][:, keep], rtol=0, atol=0)
    assert m.sora_ranks() == {"encoder.0": (3, 5), "encoder.2": (0, 5), "head": (5, 5)}
    # the pruned ranks had zero gates: the same function (exact in float64; float32 differs by rounding, the
    # random factors make branch terms much larger than the outputs)
    torch.testing.assert_close(copy.deepcopy(m.graph_module).double()(x.double()), y_before64, rtol=0, atol=1e-12)
    torch.testing.assert_close(m(x).detach(), y_before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.eval()(x).detach(), y_before, rtol=1e-5, atol=1e-5)
    m.train()
    # optimizer state follows the kept ranks; the dropped parameters lose theirs
    state = m.optimizer_state()
    torch.testing.assert_close(state["encoder.0.sora_B"]["momentum_buffer"], buffers["encoder.0.sora_B"][:, keep])
    assert not any(n.startswith("encoder.2.") for n in state)
    assert m.prune() is m and m.sora_ranks()["encoder.0"] == (3, 5)  # nothing left to prune

    # a training step after pruning equals SGD with momentum on the pruned factors (formula in the test)
    ref = {n: p.detach().clone() for n, p in m.trainable_parameters().items()}
    ref_buf = {n: s["momentum_buffer"].clone() for n, s in state.items()}
    traces = m.compile_stats().traces
    loss = F.cross_entropy(m(x), t)
    grads = dict(zip(ref, torch.autograd.grad(loss, list(m.trainable_parameters().values()))))
    m.step(x, t)
    assert m.compile_stats().traces == traces + 1  # the step graph was rebuilt for the new shapes
    for name, p in m.trainable_parameters().items():
        torch.testing.assert_close(p.detach(), ref[name] - 0.05 * (0.9 * ref_buf[name] + grads[name]),
                                   rtol=1e-6, atol=1e-7)

    # export: the pruned factors (merge=False) and the folded weights (merge=True), checked in onnxruntime
    m.eval()
    x2 = torch.randn(9, 8)
    y2 = m(x2).detach().numpy()
    for merge in (False, True):
        path = tmp_path / f"pruned_{merge}.onnx"
        report = graphopt.export(m, path, example_inputs=(x,), merge=merge)
        assert report.max_abs_diff <= 1e-5
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (out,) = session.run(None, {session.get_inputs()[0].name: x2.numpy()})
        np.testing.assert_allclose(out, y2, rtol=0, atol=1e-5)
    gm = m.export_graph(merge=False)
    shapes = {n: tuple(p.shape) for n, p in gm.named_parameters()}
    assert shapes["encoder.0.sora_A"] == (3, 8) and "encoder.2.sora_A" not in shapes
    assert "sora_gate" not in gm.code and "lora_delta" in gm.code  # the gate is folded into A′


def test_unmerged_export_writes_plain_lora_factors_on_active_ranks(mlp64) -> None:
    m = compiled(mlp64, "sora(r=3, alpha=6)")
    randomise(m, seed=9)
    with torch.no_grad():
        m.trainable_parameters()["encoder.0.sora_gate"][1] = 0.0  # one inactive rank, not pruned
    params = {n: p.detach().clone() for n, p in m.graph_module.named_parameters()}
    gm = m.export_graph(merge=False)
    exported = dict(gm.named_parameters())
    A, B, g = (params[f"encoder.0.sora_{n}"] for n in ("A", "B", "gate"))
    keep = torch.tensor([0, 2])
    torch.testing.assert_close(exported["encoder.0.sora_A"], 2.0 * g[keep, None] * A[keep], rtol=0, atol=0)
    torch.testing.assert_close(exported["encoder.0.sora_B"], B[:, keep], rtol=0, atol=0)
    assert not [n for n in exported if n.endswith("sora_gate")]
    assert m.trainable_parameters()["encoder.0.sora_A"].shape == (3, 8)  # the compiled model is untouched
    x = torch.randn(4, 8, dtype=torch.float64)
    torch.testing.assert_close(gm(x), m.eval()(x), rtol=0, atol=1e-12)


def test_merge_folds_into_the_weight(mlp64) -> None:
    m = compiled(mlp64, "sora(r=3, alpha=6)")
    randomise(m, seed=8)
    params = dict(m.graph_module.named_parameters())
    gm = m.export_graph(merge=True)
    assert not [n for n, _ in gm.named_parameters() if "sora" in n]
    assert "sora_delta" not in gm.code
    for path in LAYERS:
        A, B, g = (params[f"{path}.sora_{n}"].detach() for n in ("A", "B", "gate"))
        expected = params[f"{path}.weight"] + 2.0 * torch.einsum("or,r,ri->oi", B, g, A)
        torch.testing.assert_close(dict(gm.named_parameters())[f"{path}.weight"], expected, rtol=0, atol=1e-13)
    x = torch.randn(4, 8, dtype=torch.float64)
    torch.testing.assert_close(gm(x), m(x), rtol=0, atol=1e-13)


@pytest.mark.slow
def test_inductor_step_matches_eager(mlp64) -> None:
    x, t = torch.randn(6, 8, dtype=torch.float64), torch.randint(0, 4, (6,))
    results = []
    for backend in ("eager", "inductor"):
        m = compiled(mlp64, "sora(r=4, sparse_lambda=0.5)", "sgd(lr=0.1, momentum=0.9)", x=x, backend=backend)
        randomise(m, seed=9, gates={"encoder.0": [0.02, -0.5, 0.0, 1.0]})
        for _ in range(3):
            m.step(x, t)
        results.append({n: p.detach().clone() for n, p in m.trainable_parameters().items()})
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-10, atol=1e-10)
    gates = [n for n in results[0] if n.endswith("gate")]
    zeros = [torch.cat([res[n] == 0 for n in gates]) for res in results]
    assert torch.equal(zeros[0], zeros[1]) and zeros[0].any()  # the same gates are exactly zero


# -- a real small task -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_digits_sora_matches_lora_with_fewer_ranks() -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, test_size=0.3, random_state=0, stratify=y)
    Xtr, Xte = torch.tensor(Xtr, dtype=torch.float32), torch.tensor(Xte, dtype=torch.float32)
    ytr, yte = torch.tensor(ytr), torch.tensor(yte)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(100):  # pre-train on the original labels, full batch
        opt.zero_grad()
        F.cross_entropy(net(Xtr), ytr).backward()
        opt.step()
    accuracy = lambda f, labels: (f(Xte).argmax(1) == labels).float().mean().item()  # noqa: E731
    assert accuracy(net, yte) > 0.95
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    ytr2, yte2 = perm[ytr], perm[yte]  # the new task: permuted labels
    assert accuracy(net, yte2) < 0.2

    r, alpha, lr, steps, batch = 8, 16, 0.005, 400, 128

    def batches():
        gen, per_epoch = torch.Generator().manual_seed(1), len(Xtr) // batch
        for s in range(steps):
            if s % per_epoch == 0:
                order = torch.randperm(len(Xtr), generator=gen)
            idx = order[(s % per_epoch) * batch:(s % per_epoch + 1) * batch]
            yield Xtr[idx], ytr2[idx]

    # plain LoRA in PyTorch: W x + (alpha/r) B A x, torch.optim.SGD with momentum
    import copy

    torch.manual_seed(1)
    lora_net = copy.deepcopy(net).requires_grad_(False)
    adapters = []
    for layer in (lora_net[0], lora_net[2], lora_net[4]):
        A = torch.empty(r, layer.in_features)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        adapters.append((layer, nn.Parameter(A), nn.Parameter(torch.zeros(layer.out_features, r))))

    def lora_forward(x):
        h = x
        for i, (layer, A, B) in enumerate(adapters):
            h = layer(h) + alpha / r * (h @ A.T) @ B.T
            h = torch.relu(h) if i < 2 else h
        return h

    opt = torch.optim.SGD([p for _, A, B in adapters for p in (A, B)], lr=lr, momentum=0.9)
    for xb, yb in batches():
        opt.zero_grad()
        F.cross_entropy(lora_forward(xb), yb).backward()
        opt.step()
    with torch.no_grad():
        lora_acc = accuracy(lora_forward, yte2)

    torch.manual_seed(1)
    m = graphopt.compile(net, methods=[f"sora(r={r}, alpha={alpha}, sparse_lambda=0.7)", f"sgd(lr={lr}, momentum=0.9)"],
                         loss_fn=F.cross_entropy, example_inputs=(Xtr[:batch],), backend="eager")
    for xb, yb in batches():
        m.step(xb, yb)
    with torch.no_grad():
        sora_acc = accuracy(m.eval(), yte2)
    active = sum(a for a, _ in m.sora_ranks().values())
    assert lora_acc > 0.9
    assert sora_acc >= lora_acc - 0.01, (sora_acc, lora_acc)
    assert active < 3 * r, m.sora_ranks()
    with torch.no_grad():
        before = m(Xte)
        m.prune()
        dims = {"0": (64, 64), "2": (64, 64), "4": (64, 10)}
        expected = sum(a * (dims[path][0] + dims[path][1] + 1) for path, (a, _) in m.sora_ranks().items())
        assert sum(p.numel() for _, p in m.trainable_parameters().items()) == expected
        assert (m(Xte) - before).abs().max() <= 1e-5
