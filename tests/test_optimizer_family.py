"""The Muon family (normuon, adamuon, adago, auon / Hybrid-AuON, turbo_muon, root) against references written
from each paper in plain PyTorch on ``.grad`` of an eager copy (no graphopt code): 20 steps in float64 to 1e-10,
on an MLP (tall, square and wide matrices) and a conv net (conv weights flattened, one of them tall); option
validation; the shared Newton–Schulz helpers; one inductor run per optimizer (slow)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.optim import functional

STEPS = 20
MUON = (3.4445, -4.7750, 2.0315)
TURBO = [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
         (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)]  # the Turbo-Muon authors' schedule
ROOT_TABLE = {(2048, 2048): (3.4916, -4.8224, 2.1095), (2048, 3072): (3.4509, -4.5790, 1.9325),
              (2048, 8192): (2.9794, -3.6674, 1.6207), (2048, 16384): (3.1943, -3.8221, 1.5322)}  # ROOT's release

pytestmark = pytest.mark.usefixtures("one_thread")


class ConvNet(nn.Module):
    """A wide conv weight (6, 2·3·3), a tall 1×1 conv (8, 6), a wide, a tall and a wide linear, and biases."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.mix = nn.Conv2d(6, 8, 1)
        self.fc = nn.Linear(8 * 4 * 4, 24)
        self.up = nn.Linear(24, 40)
        self.head = nn.Linear(40, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.mix(torch.relu(self.conv(x)))).flatten(1)
        return self.head(torch.tanh(self.up(torch.tanh(self.fc(h)))))


def make_model(kind: str) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    from models import MLP

    torch.manual_seed(0)
    model, shape, classes = (MLP(), (6, 8), 4) if kind == "mlp" else (ConvNet(), (3, 2, 4, 4), 5)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(*shape, generator=gen, dtype=torch.float64), torch.randint(0, classes, (shape[0],),
                                                                                   generator=gen))
            for _ in range(STEPS)]
    return model.double(), data


# -- references, from the papers ---------------------------------------------------------------------------------
def ns_reference(m: torch.Tensor, schedule: list[tuple[float, float, float]], aol: bool = False) -> torch.Tensor:
    """Quintic Newton–Schulz: start at M/‖M‖_F (or, with AOL, diag(s)M, s_i = (Σ_j |MMᵀ|_ij)^(-1/2)), then
    X ← aX + (bA + cA²)X with A = XXᵀ for each (a, b, c); on Mᵀ when M is tall."""
    transposed = m.shape[0] > m.shape[1]
    x = m.T if transposed else m
    if aol:
        s = 1.0 / torch.sqrt(torch.clamp((x @ x.T).abs().sum(dim=1), min=1e-6))
        x = s[:, None] * x
    else:
        x = x / torch.sqrt((x * x).sum())
    for a, b, c in schedule:
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


def quantile_reference(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile with linear interpolation between the order statistics around q·(N − 1)."""
    ordered = values.flatten().sort().values
    position = q * (ordered.numel() - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def normuon_rule(w, g, s, lr, betas=(0.95, 0.95), eps=1e-8, ns_steps=5, weight_decay=0.0, **_):
    """Li et al. 2025, Algorithm 1."""
    s["M"] = betas[0] * s.get("M", torch.zeros_like(g)) + (1 - betas[0]) * g
    o = ns_reference(s["M"], [MUON] * ns_steps)
    s["v"] = betas[1] * s.get("v", torch.zeros(g.shape[0], dtype=g.dtype)) + (1 - betas[1]) * (o * o).mean(dim=1)
    o_hat = o / (torch.sqrt(s["v"])[:, None] + eps)
    eta_hat = 0.2 * lr * math.sqrt(g.numel()) / torch.sqrt((o_hat * o_hat).sum())
    return w - lr * weight_decay * w - eta_hat * o_hat


def adamuon_rule(w, g, s, lr, momentum=0.95, nesterov=False, ns_steps=5, eps=1e-8, weight_decay=0.0, **_):
    """Si et al. 2025, Algorithm 1 (Nesterov as the authors' code, when asked)."""
    s["M"] = momentum * s.get("M", torch.zeros_like(g)) + g
    n = g + momentum * s["M"] if nesterov else s["M"]
    o = ns_reference(torch.sign(n), [MUON] * ns_steps)
    s["V"] = momentum * s.get("V", torch.zeros_like(g)) + (1 - momentum) * o * o
    o_hat = o / (torch.sqrt(s["V"]) + eps)
    gamma = 0.2 * math.sqrt(g.numel()) / torch.sqrt((o_hat * o_hat).sum())
    return w - lr * (gamma * o_hat + weight_decay * w)


def adago_rule(w, g, s, lr, momentum=0.95, gamma=1.0, eps=1e-6, v0=1.0, ns_steps=5, weight_decay=0.0, **_):
    """Zhang, Liu and Schaeffer 2025, Algorithm 1."""
    s["M"] = momentum * s.get("M", torch.zeros_like(g)) + (1 - momentum) * g
    norm = torch.sqrt((g * g).sum()).item()
    s["v2"] = s.get("v2", v0 ** 2) + min(norm ** 2, gamma ** 2)
    alpha = max(eps, lr * min(norm, gamma) / math.sqrt(s["v2"]))
    return w * (1 - lr * weight_decay) - alpha * ns_reference(s["M"], [MUON] * ns_steps)


def auon_rule(w, g, s, lr, momentum=0.95, nesterov=True, hybrid=False, weight_decay=0.0, **_):
    """Maity 2025, section 3 (AuON) and 3.2 (Hybrid-AuON: one Newton–Schulz step)."""
    s["B"] = momentum * s.get("B", torch.zeros_like(g)) + (1 - momentum) * g
    d = momentum * s["B"] + (1 - momentum) * g if nesterov else s["B"]
    x = ns_reference(d, [MUON]) if hybrid else d / (torch.sqrt((d * d).sum()) + 1e-7)
    r = torch.sqrt(torch.mean(torch.cosh(x) ** 2))
    return w * (1 - lr * weight_decay) - lr * x / (r + 1e-8)


def turbo_muon_rule(w, g, s, lr, momentum=0.95, nesterov=True, ns_steps=4, weight_decay=0.0, **_):
    """Boissin et al. 2025: Muon with AOL preconditioning and the last ns_steps of the 5-step schedule."""
    s["B"] = momentum * s.get("B", torch.zeros_like(g)) + g
    n = g + momentum * s["B"] if nesterov else s["B"]
    x = ns_reference(n, TURBO[-ns_steps:], aol=True)
    return w * (1 - lr * weight_decay) - lr * math.sqrt(max(1.0, g.shape[0] / g.shape[1])) * x


def root_rule(w, g, s, lr, momentum=0.95, nesterov=True, ns_steps=5, threshold_quantile=0.9, weight_decay=0.0,
              table=None, **_):
    """He et al. 2025, Algorithm 1, with the authors' threshold (a quantile of |M|) and 0.2·√max(m, n) scale."""
    s["B"] = momentum * s.get("B", torch.zeros_like(g)) + g
    m = g + momentum * s["B"] if nesterov else s["B"]
    eps = quantile_reference(m.abs(), threshold_quantile) + 1e-9
    outliers = torch.sign(m) * torch.clamp(m.abs() - eps, min=0)
    rows, cols = g.shape
    coefficients = (table or ROOT_TABLE).get((min(rows, cols), max(rows, cols)), MUON)
    x = ns_reference(m - outliers, [coefficients] * ns_steps)
    return w * (1 - lr * weight_decay) - lr * 0.2 * math.sqrt(max(rows, cols)) * x


RULES: dict[str, Callable] = {"normuon": normuon_rule, "adamuon": adamuon_rule, "adago": adago_rule,
                              "auon": auon_rule, "turbo_muon": turbo_muon_rule, "root": root_rule}
DEFAULT_LR = {"normuon": 1e-3, "adamuon": 1e-3, "adago": 0.1, "auon": 0.055, "turbo_muon": 0.02, "root": 1e-3}
DEFAULT_ADAMW_LR = {"normuon": 1e-3, "adamuon": 1e-3, "adago": 3e-4, "auon": 3e-4, "turbo_muon": 3e-4, "root": 1e-3}


def reference_train(model: nn.Module, data, name: str, options: dict, table=None) -> None:
    """Train ``model`` eagerly: the paper's rule on every ≥2-D weight viewed (rows, rest), AdamW(0.9, 0.95) on
    the rest with lr adamw_lr."""
    lr = options.get("lr", DEFAULT_LR[name])
    adamw_lr = options.get("adamw_lr", DEFAULT_ADAMW_LR[name])
    rule_options = {k: v for k, v in options.items() if k not in ("lr", "adamw_lr")}
    state: dict[nn.Parameter, dict] = {}
    for t, (x, y) in enumerate(data, start=1):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                s = state.setdefault(p, {})
                if p.dim() >= 2:
                    w, g = p.reshape(p.shape[0], -1), p.grad.reshape(p.shape[0], -1)
                    p.copy_(RULES[name](w, g, s, lr, table=table, **rule_options).reshape(p.shape))
                else:
                    g = p.grad
                    s["m"] = 0.9 * s.get("m", torch.zeros_like(p)) + 0.1 * g
                    s["v"] = 0.95 * s.get("v", torch.zeros_like(p)) + 0.05 * g * g
                    m_hat, v_hat = s["m"] / (1 - 0.9 ** t), s["v"] / (1 - 0.95 ** t)
                    p.copy_(p - adamw_lr * m_hat / (torch.sqrt(v_hat) + 1e-8))


def max_diff(a: dict[str, torch.Tensor], b: nn.Module) -> float:
    theirs = dict(b.named_parameters())
    assert a.keys() == theirs.keys()
    return max((a[k] - theirs[k]).abs().max().item() for k in a)


CASES = [
    ("normuon", {}),
    ("normuon", {"lr": 3e-3, "betas": (0.9, 0.99), "eps": 1e-6, "ns_steps": 3, "weight_decay": 0.1, "adamw_lr": 2e-3}),
    ("adamuon", {}),
    ("adamuon", {"lr": 3e-3, "momentum": 0.9, "nesterov": True, "ns_steps": 4, "eps": 1e-6, "weight_decay": 0.1}),
    ("adago", {}),
    ("adago", {"lr": 0.3, "momentum": 0.9, "gamma": 0.05, "eps": 0.08, "v0": 0.1, "ns_steps": 3,
               "weight_decay": 0.1, "adamw_lr": 1e-3}),
    ("auon", {}),
    ("auon", {"lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 0.1, "adamw_lr": 1e-3}),
    ("auon", {"hybrid": True}),
    ("turbo_muon", {}),
    ("turbo_muon", {"lr": 0.05, "momentum": 0.9, "nesterov": False, "ns_steps": 5, "weight_decay": 0.1}),
    ("root", {}),
    ("root", {"lr": 3e-3, "momentum": 0.9, "nesterov": False, "ns_steps": 3, "threshold_quantile": 0.5,
              "weight_decay": 0.1, "adamw_lr": 2e-3}),
]


def trained_pair(kind: str, name: str, options: dict, backend: str = "eager", table=None, dtype=torch.float64):
    model, data = make_model(kind)
    model, data = model.to(dtype), [(x.to(dtype), y) for x, y in data]
    reference, initial = copy.deepcopy(model), copy.deepcopy(model)
    reference_train(reference, data, name, options, table)
    m = graphopt.compile(model, methods=[(name, options)], loss_fn=F.cross_entropy, backend=backend)
    for x, y in data:
        m.step(x, y)
    ours = {n: p for n, p in m.named_parameters() if p.requires_grad}
    return ours, reference, initial, m


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_equals_paper_reference_float64(kind: str, name: str, options: dict) -> None:
    ours, reference, initial, _ = trained_pair(kind, name, options)
    assert max_diff(ours, initial) > 1e-3, "training moved the parameters"
    assert max_diff(ours, reference) < 1e-10


def test_root_uses_its_shape_table(monkeypatch) -> None:
    """A shape with published coefficients takes them (the MLP's 16×16 layer, given a made-up triple here)."""
    table = {**ROOT_TABLE, (16, 16): (3.0, -3.2, 1.2)}
    monkeypatch.setitem(functional.ROOT_COEFFICIENTS, (16, 16), (3.0, -3.2, 1.2))
    ours, reference, _, _ = trained_pair("mlp", "root", {}, table=table)
    assert max_diff(ours, reference) < 1e-10
    _, plain, _, _ = trained_pair("mlp", "root", {})  # the reference with Muon's triple differs: the table mattered
    assert (ours["encoder.2.weight"] - dict(plain.named_parameters())["encoder.2.weight"]).abs().max() > 1e-6


def test_state_per_parameter() -> None:
    expected = {"normuon": {"momentum_buffer": (8, 6, 1, 1), "second_moment": (8,)},
                "adamuon": {"momentum_buffer": (8, 6, 1, 1), "second_moment": (8, 6, 1, 1)},
                "adago": {"momentum_buffer": (8, 6, 1, 1), "v_sq": ()},
                "auon": {"momentum_buffer": (8, 6, 1, 1)}, "turbo_muon": {"momentum_buffer": (8, 6, 1, 1)},
                "root": {"momentum_buffer": (8, 6, 1, 1)}}
    for name, slots in expected.items():
        _, _, _, m = trained_pair("conv", name, {})
        state = m.optimizer_state()
        assert {k: tuple(v.shape) for k, v in state["mix.weight"].items()} == slots, name
        assert set(state["mix.bias"]) == {"step", "exp_avg", "exp_avg_sq"}, name


# -- options ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, match", [
    ("normuon(lr=0)", "option lr=0 is invalid"),
    ("normuon(betas=(0.95, 1.0))", r"option betas=\(0.95, 1.0\) is invalid"),
    ("normuon(eps=0)", "option eps=0 is invalid"),
    ("normuon(ns_steps=0)", "option ns_steps=0 is invalid"),
    ("adamuon(momentum=1.0)", "option momentum=1.0 is invalid"),
    ("adamuon(weight_decay=-0.1)", "option weight_decay=-0.1 is invalid"),
    ("adamuon(nesterov='yes')", "option 'nesterov' must be bool"),
    ("adago(gamma=0)", "option gamma=0 is invalid"),
    ("adago(v0=0)", "option v0=0 is invalid"),
    ("adago(eps=-1)", "option eps=-1 is invalid"),
    ("auon(momentum=-0.1)", r"option momentum=-0.1 is invalid"),
    ("auon(adamw_lr=-1)", "option adamw_lr=-1 is invalid"),
    ("auon(ns_steps=2)", "has no option 'ns_steps'"),
    ("turbo_muon(ns_steps=6)", r"option ns_steps=6 is invalid; use 1 <= ns_steps <= 5"),
    ("turbo_muon(ns_steps=0)", r"option ns_steps=0 is invalid; use 1 <= ns_steps <= 5"),
    ("root(threshold_quantile=0)", "option threshold_quantile=0 is invalid"),
    ("root(threshold_quantile=1.5)", "option threshold_quantile=1.5 is invalid"),
    ("root(lr=-1)", "option lr=-1 is invalid"),
])
def test_bad_options_raise_option_error(mlp, spec: str, match: str) -> None:
    with pytest.raises(graphopt.OptionError, match=match):
        graphopt.compile(mlp, methods=[spec], loss_fn=F.cross_entropy, backend="eager")


def test_defaults_follow_the_docs() -> None:
    methods = graphopt.list_methods()
    defaults = {n: {o.name: o.default for o in methods[n].options if o.name not in ("groups", "max_grad_norm")}
                for n in RULES}
    assert defaults == {
        "normuon": {"lr": 1e-3, "betas": (0.95, 0.95), "eps": 1e-8, "ns_steps": 5, "weight_decay": 0.0,
                    "adamw_lr": 1e-3},
        "adamuon": {"lr": 1e-3, "momentum": 0.95, "nesterov": False, "ns_steps": 5, "eps": 1e-8,
                    "weight_decay": 0.0, "adamw_lr": 1e-3},
        "adago": {"lr": 0.1, "momentum": 0.95, "gamma": 1.0, "eps": 1e-6, "v0": 1.0, "ns_steps": 5,
                  "weight_decay": 0.0, "adamw_lr": 3e-4},
        "auon": {"lr": 0.055, "momentum": 0.95, "nesterov": True, "hybrid": False, "weight_decay": 0.0,
                 "adamw_lr": 3e-4},
        "turbo_muon": {"lr": 0.02, "momentum": 0.95, "nesterov": True, "ns_steps": 4, "weight_decay": 0.0,
                       "adamw_lr": 3e-4},
        "root": {"lr": 1e-3, "momentum": 0.95, "nesterov": True, "ns_steps": 5, "threshold_quantile": 0.9,
                 "weight_decay": 0.0, "adamw_lr": 1e-3},
    }
    assert all(methods[n].stage == "training" for n in RULES)


# -- the shared Newton–Schulz helpers ---------------------------------------------------------------------------
def test_newton_schulz_schedule_equals_the_formula() -> None:
    g = torch.randn(12, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for matrix in (g, g.T):
        assert torch.allclose(functional.newton_schulz(matrix, 3, TURBO[:3]), ns_reference(matrix, TURBO[:3]),
                              rtol=0, atol=1e-12)
        assert torch.allclose(functional.newton_schulz(matrix, 4, TURBO[1:], aol=True),
                              ns_reference(matrix, TURBO[1:], aol=True), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="needs 4 triples"):
        functional.newton_schulz(g, 4, TURBO[:3])


def test_aol_rescaling_bounds_the_spectral_norm() -> None:
    """Prach & Lampert's bound: ‖diag(s) X‖₂ ≤ 1 for any X, however badly scaled (so NS starts in range)."""
    gen = torch.Generator().manual_seed(5)
    for x in (torch.randn(20, 50, dtype=torch.float64, generator=gen) * 1e3,
              torch.randn(20, 50, dtype=torch.float64, generator=gen) * torch.logspace(-3, 3, 50, dtype=torch.float64)):
        scaled, gram = functional.aol_rescale(x)
        assert torch.linalg.matrix_norm(scaled, ord=2) <= 1 + 1e-12
        assert torch.allclose(gram, scaled @ scaled.T, rtol=1e-12, atol=1e-12)


def test_turbo_four_steps_orthogonalise_as_well_as_muon_five() -> None:
    """The paper's claim on a Gaussian matrix: AOL + 4 iterations lands in (at least) Muon's 5-step band."""
    g = torch.randn(64, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    turbo = torch.linalg.svdvals(functional.newton_schulz(g, 4, functional.TURBO_SCHEDULE[1:], aol=True))
    muon = torch.linalg.svdvals(functional.newton_schulz(g, 5))
    assert (turbo - 1).abs().max() <= (muon - 1).abs().max()
    assert functional.newton_schulz(torch.zeros(4, 3, dtype=torch.float64), 4, functional.TURBO_SCHEDULE[1:],
                                    aol=True).abs().max() == 0  # no NaN for a zero update


def test_root_coefficients_lookup() -> None:
    for (short, long), triple in ROOT_TABLE.items():
        assert functional.root_coefficients(short, long) == triple
        assert functional.root_coefficients(long, short) == triple
    assert functional.root_coefficients(16, 16) == MUON


# -- inductor ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name, options", [(n, o) for n, o in CASES if not o] + [("auon", {"hybrid": True})])
def test_inductor_equals_reference_float32(name: str, options: dict) -> None:
    """The MLP: on the conv net AdaMuon's sign() of near-zero momentum entries (ReLU channels) flips between
    float32 evaluation orders (4e-4 apart, eager graph included), a property of the rule, not of inductor."""
    ours, reference, initial, m = trained_pair("mlp", name, options, backend="inductor", dtype=torch.float32)
    assert max_diff(ours, initial) > 1e-3
    assert max_diff(ours, reference) < 1e-5
    m.set_lr(DEFAULT_LR[name] / 2)
    x, y = make_model("mlp")[1][0]
    m.step(x.float(), y)
    assert m.compile_stats().traces == 1
