"""Fused optimizers (sgd, adamw, muon) against torch.optim and plain-PyTorch references; groups, clipping,
lr schedules without recompiling, optimizer-state round trip, the graphopt.optim extension point and the
update scheduling pass."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.train.schedule import mutated_inputs, update_tag

STEPS = 20


class ConvNet(nn.Module):
    """Conv weight (4-D, flattened for Muon), a tall (rows > cols) and a wide matrix, and biases."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.up = nn.Linear(3 * 4 * 4, 40)
        self.head = nn.Linear(40, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.up(torch.relu(self.conv(x)).flatten(1))))


def batches(shape: tuple[int, ...], classes: int, n: int = STEPS, seed: int = 1) -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=gen, dtype=torch.float64),
             torch.randint(0, classes, (shape[0],), generator=gen)) for _ in range(n)]


def run_torch(model: nn.Module, optimizer: torch.optim.Optimizer, data, clip: float | None = None) -> None:
    for x, y in data:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()


def run_graphopt(model: nn.Module, spec, data, backend: str = "eager") -> graphopt.CompiledModel:
    m = graphopt.compile(model, methods=[spec], loss_fn=F.cross_entropy, backend=backend)
    for x, y in data:
        m.step(x, y)
    return m


def max_diff(m: graphopt.CompiledModel, reference: nn.Module) -> float:
    ours = m.trainable_parameters()
    theirs = dict(reference.named_parameters())
    assert ours.keys() == theirs.keys()
    return max((ours[k] - theirs[k]).abs().max().item() for k in ours)


def moved(m: graphopt.CompiledModel, initial: nn.Module) -> float:
    """How far training moved the parameters (guards against comparing two runs that did nothing)."""
    return max_diff(m, initial)


@pytest.fixture
def mlp64(mlp) -> nn.Module:
    return mlp.double()


pytestmark = pytest.mark.usefixtures("one_thread")


# -- sgd / adamw against torch.optim --------------------------------------------------------------------------
@pytest.mark.parametrize("options", [
    {"lr": 0.1},
    {"lr": 0.1, "momentum": 0.9},
    {"lr": 0.05, "momentum": 0.9, "nesterov": True},
    {"lr": 0.1, "momentum": 0.8, "weight_decay": 1e-2},
    {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-2},
])
def test_sgd_equals_torch_optim_float64(mlp64, options) -> None:
    data = batches((6, 8), 4)
    reference, initial = copy.deepcopy(mlp64), copy.deepcopy(mlp64)
    run_torch(reference, torch.optim.SGD(reference.parameters(), **options), data)
    m = run_graphopt(mlp64, ("sgd", options), data)
    assert moved(m, initial) > 1e-2
    assert max_diff(m, reference) < 1e-10


@pytest.mark.parametrize("options", [
    {},
    {"lr": 3e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1},
    {"lr": 1e-2, "weight_decay": 0.0},
])
def test_adamw_equals_torch_optim_float64(mlp64, options) -> None:
    data = batches((6, 8), 4)
    reference, initial = copy.deepcopy(mlp64), copy.deepcopy(mlp64)
    run_torch(reference, torch.optim.AdamW(reference.parameters(), **options), data)
    m = run_graphopt(mlp64, ("adamw", options), data)
    assert moved(m, initial) > 1e-2
    assert max_diff(m, reference) < 1e-10


def test_adamw_defaults_follow_design() -> None:
    info = graphopt.list_methods()["adamw"]
    defaults = {o.name: o.default for o in info.options}
    assert defaults == {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2,
                        "groups": None, "max_grad_norm": None}
    assert info.stage == "training"
    muon = {o.name: o.default for o in graphopt.list_methods()["muon"].options}
    assert muon == {"lr": 0.02, "momentum": 0.95, "nesterov": True, "ns_steps": 5, "weight_decay": 0.0,
                    "adamw_lr": 3e-4, "groups": None, "max_grad_norm": None}


# -- muon against a plain-PyTorch reference -------------------------------------------------------------------
def reference_muon(model: nn.Module, data, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0,
                   adamw_lr=3e-4) -> None:
    """Muon from Jordan et al. 2024, written out on .grad with no graphopt code."""
    state: dict[nn.Parameter, dict[str, torch.Tensor]] = {}
    for t, (x, y) in enumerate(data, start=1):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                g = p.grad
                if p.dim() >= 2:
                    buf = state.setdefault(p, {"B": torch.zeros_like(p)})["B"]
                    buf.copy_(momentum * buf + g)
                    n = (g + momentum * buf) if nesterov else buf.clone()
                    n = n.reshape(p.shape[0], -1)
                    rows, cols = n.shape
                    transposed = rows > cols
                    xm = n.T if transposed else n
                    xm = xm / torch.sqrt((xm * xm).sum())
                    for _ in range(ns_steps):
                        a_mat = xm @ xm.T
                        xm = 3.4445 * xm + (-4.7750 * a_mat + 2.0315 * a_mat @ a_mat) @ xm
                    n_orth = (xm.T if transposed else xm).reshape(p.shape)
                    scale = math.sqrt(max(1.0, rows / cols))
                    p.copy_(p * (1 - lr * weight_decay) - lr * scale * n_orth)
                else:
                    s = state.setdefault(p, {"m": torch.zeros_like(p), "v": torch.zeros_like(p)})
                    s["m"] = 0.9 * s["m"] + 0.1 * g
                    s["v"] = 0.95 * s["v"] + 0.05 * g * g
                    m_hat = s["m"] / (1 - 0.9 ** t)
                    v_hat = s["v"] / (1 - 0.95 ** t)
                    p.copy_(p - adamw_lr * m_hat / (torch.sqrt(v_hat) + 1e-8))


@pytest.mark.parametrize("options", [{}, {"lr": 0.05, "momentum": 0.9, "nesterov": False, "weight_decay": 0.1,
                                          "ns_steps": 3, "adamw_lr": 1e-3}])
def test_muon_equals_reference_float64(options) -> None:
    torch.manual_seed(0)
    model = ConvNet().double()
    data = batches((3, 2, 4, 4), 5)
    reference, initial = copy.deepcopy(model), copy.deepcopy(model)
    reference_muon(reference, data, **options)
    m = run_graphopt(model, ("muon", options), data)
    assert moved(m, initial) > 1e-2
    assert max_diff(m, reference) < 1e-10
    shapes = {n: s.keys() for n, s in m.optimizer_state().items()}
    assert set(shapes["conv.weight"]) == {"momentum_buffer"} and set(shapes["up.bias"]) == {"step", "exp_avg",
                                                                                          "exp_avg_sq"}


def test_muon_update_is_orthogonal() -> None:
    """One step from zero momentum: W changes by lr·scale·NS(G); NS(G) has singular values near 1."""
    from graphopt.builtin.muon import newton_schulz

    g = torch.randn(30, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    singular = torch.linalg.svdvals(newton_schulz(g, 5))
    assert singular.min() > 0.6 and singular.max() < 1.25  # the quintic's known band around 1 (Jordan et al.)
    assert newton_schulz(torch.zeros(4, 3, dtype=torch.float64)).abs().max() == 0  # no NaN for a zero update


# -- options, groups, clipping ---------------------------------------------------------------------------------
def test_groups_equal_torch_param_groups(mlp64) -> None:
    data = batches((6, 8), 4)
    reference = copy.deepcopy(mlp64)
    biases = [p for n, p in reference.named_parameters() if n.endswith("bias")]
    head_w = [reference.head.weight]
    rest = [p for n, p in reference.named_parameters() if not n.endswith("bias") and n != "head.weight"]
    optimizer = torch.optim.AdamW([{"params": rest}, {"params": biases, "weight_decay": 0.0},
                                   {"params": head_w, "lr": 5e-3, "betas": (0.5, 0.9)}], lr=2e-2, weight_decay=0.1)
    run_torch(reference, optimizer, data)
    spec = "adamw(lr=2e-2, weight_decay=0.1, groups={'*.bias': {'weight_decay': 0}, 'head.w*': {'lr': 5e-3, " \
           "'betas': (0.5, 0.9)}})"
    m = run_graphopt(mlp64, spec, data)
    assert max_diff(m, reference) < 1e-10
    assert "groups={'*.bias'" in repr(m)


def test_later_group_overrides_earlier(mlp64) -> None:
    data = batches((6, 8), 4, n=5)
    reference = copy.deepcopy(mlp64)
    head_bias = [reference.head.bias]
    others = [p for n, p in reference.named_parameters() if n != "head.bias"]
    run_torch(reference, torch.optim.SGD([{"params": others}, {"params": head_bias, "momentum": 0.5}],
                                         lr=0.1, momentum=0.9), data)
    m = run_graphopt(mlp64, "sgd(lr=0.1, momentum=0.9, groups={'*': {'momentum': 0.1}, 'head.bias': "
                            "{'momentum': 0.5}, 'encoder*': {'momentum': 0.9}, 'head.weight': {'momentum': 0.9}})",
                     data)
    assert max_diff(m, reference) < 1e-10


@pytest.mark.parametrize("spec, match", [
    ("adamw(groups={'*.bias': {'foo': 1}})", r"groups\['\*.bias'\] sets 'foo'.*group options are: betas, eps, lr"),
    ("adamw(groups={'*.bias': {'weight_decay': -1}})", r"groups\['\*.bias'\].*weight_decay=-1 is invalid"),
    ("adamw(groups={'*.bias': 0.1})", r"groups\['\*.bias'\] must be a dict"),
    ("adamw(groups=[1])", "option groups=.*invalid; use a dict"),
    ("adamw(max_grad_norm=0)", "max_grad_norm=0 is invalid; use a number > 0"),
    ("adamw(betas=(0.9, 1.0))", "betas=.*invalid"),
    ("sgd(lr=0.1, nesterov=True)", "nesterov=True needs momentum > 0"),
    ("muon(ns_steps=0)", "ns_steps=0 is invalid"),
    ("muon(lr=0)", "option lr=0 is invalid"),
    ("adamw(groups={'*': {'groups': {}}})", "sets 'groups', which a group cannot set"),
])
def test_bad_options_raise_option_error(mlp, spec, match) -> None:
    with pytest.raises(graphopt.OptionError, match=match):
        graphopt.compile(mlp, methods=[spec], loss_fn=F.cross_entropy, backend="eager")


def test_group_matching_no_parameter_is_an_error(mlp) -> None:
    m = graphopt.compile(mlp, methods=["adamw(groups={'*.gamma': {'weight_decay': 0}})"], loss_fn=F.cross_entropy,
                         backend="eager")
    with pytest.raises(graphopt.OptionError, match=r"'\*.gamma' matches no trainable parameter.*head.bias"):
        m.step(torch.randn(2, 8), torch.tensor([0, 1]))


def test_two_optimizers_is_a_clear_error(mlp) -> None:
    with pytest.raises(graphopt.OptionError, match="one optimizer method per model, got 'sgd', 'adamw'"):
        graphopt.compile(mlp, methods=["sgd(lr=0.1)", "adamw"], loss_fn=F.cross_entropy,
                         example_inputs=(torch.randn(2, 8),), backend="eager")


@pytest.mark.parametrize("spec, make", [
    ("sgd(lr=0.2, momentum=0.9, max_grad_norm=0.05)", lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9)),
    ("adamw(lr=1e-2, max_grad_norm=0.05)", lambda p: torch.optim.AdamW(p, lr=1e-2)),
])
def test_max_grad_norm_equals_clip_grad_norm(mlp64, spec, make) -> None:
    data = batches((6, 8), 4)
    reference, unclipped = copy.deepcopy(mlp64), copy.deepcopy(mlp64)
    run_torch(reference, make(reference.parameters()), data, clip=0.05)
    run_torch(unclipped, make(unclipped.parameters()), data)
    m = run_graphopt(mlp64, spec, data)
    assert max_diff(m, reference) < 1e-10
    assert max_diff(m, unclipped) > 1e-3  # clipping was active


# -- lr without recompiling, schedules -------------------------------------------------------------------------
def test_set_lr_does_not_recompile(mlp64) -> None:
    data = batches((6, 8), 4, n=6)
    reference = copy.deepcopy(mlp64)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    m = graphopt.compile(mlp64, methods=["sgd(lr=0.1, momentum=0.9)"], loss_fn=F.cross_entropy, backend="eager")
    for i, (x, y) in enumerate(data):
        lr = 0.1 / (i + 1)
        m.set_lr(lr)
        optimizer.param_groups[0]["lr"] = lr
        m.step(x, y)
        run_torch(reference, optimizer, [(x, y)])
    assert m.compile_stats().traces == 1
    assert max_diff(m, reference) < 1e-10


def test_cosine_schedule_matches_lambda_lr_without_recompiling(mlp64) -> None:
    data = batches((6, 8), 4, n=12)
    base, warmup, total, floor = 3e-2, 3, 10, 1e-3
    reference = copy.deepcopy(mlp64)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=base)
    # LambdaLR's factor for step t (1-based here: the scheduler is stepped before each optimizer step)
    def factor(t: int) -> float:
        if t <= warmup:
            return t / warmup
        progress = min(1.0, (t - warmup) / (total - warmup))
        return (floor + (base - floor) * (1 + math.cos(math.pi * progress)) / 2) / base
    m = graphopt.compile(mlp64, methods=[f"adamw(lr={base})"], loss_fn=F.cross_entropy, backend="eager")
    m.set_lr_schedule(graphopt.optim.cosine_with_warmup(base, warmup, total, min_lr=floor))
    for t, (x, y) in enumerate(data, start=1):
        optimizer.param_groups[0]["lr"] = base * factor(t)
        run_torch(reference, optimizer, [(x, y)])
        m.step(x, y)
        assert m.lr == pytest.approx(base * factor(t), rel=1e-12)
    assert m.lr == pytest.approx(floor)
    assert m.compile_stats().traces == 1
    assert max_diff(m, reference) < 1e-10


def test_lr_schedule_errors(mlp) -> None:
    m = graphopt.compile(mlp, methods=["sgd(lr=0.1)"], loss_fn=F.cross_entropy, backend="eager")
    with pytest.raises(graphopt.OptionError, match="takes a callable"):
        m.set_lr_schedule(0.1)
    m.set_lr_schedule(lambda step: -1.0)
    with pytest.raises(graphopt.OptionError, match=r"lr schedule at step 1: .*got -1\.0"):
        m.step(torch.randn(2, 8), torch.tensor([0, 1]))
    with pytest.raises(graphopt.OptionError, match="warmup_steps < total_steps"):
        graphopt.optim.cosine_with_warmup(0.1, 10, 10)


# -- optimizer state round trip --------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["adamw(lr=1e-2, groups={'*.bias': {'weight_decay': 0}})",
                                  "muon(lr=0.05)", "sgd(lr=0.1, momentum=0.9, nesterov=True)"])
def test_state_round_trip_continues_identically(spec) -> None:
    torch.manual_seed(0)
    model = ConvNet().double()
    data = batches((3, 2, 4, 4), 5, n=8)
    whole = graphopt.compile(copy.deepcopy(model), methods=[spec], loss_fn=F.cross_entropy, backend="eager")
    first = graphopt.compile(copy.deepcopy(model), methods=[spec], loss_fn=F.cross_entropy, backend="eager")
    schedule = graphopt.optim.cosine_with_warmup(whole.methods[0].lr, 2, 8)
    whole.set_lr_schedule(schedule)
    first.set_lr_schedule(schedule)
    for x, y in data:
        whole.step(x, y)
    for x, y in data[:4]:
        first.step(x, y)
    saved = first.state_dict()
    assert saved["_graphopt.step"] == 4
    torch.manual_seed(123)
    fresh = graphopt.compile(ConvNet().double(), methods=[spec], loss_fn=F.cross_entropy, backend="eager")
    fresh.load_state_dict(saved)
    fresh.set_lr_schedule(schedule)
    for x, y in data[4:]:
        fresh.step(x, y)
    assert max_diff(fresh, whole.graph_module) == 0.0
    for name, slots in whole.optimizer_state().items():
        for slot, value in slots.items():
            assert torch.equal(fresh.optimizer_state()[name][slot], value), (name, slot)


# -- graphopt.optim extension point: a third-party optimizer ----------------------------------------------------
class Lion(graphopt.optim.Optimizer):
    """Lion (Chen et al. 2023), written the way docs/methods/optimizers.md shows."""

    name = "lion-test"

    def __init__(self, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        self.lr, self.betas, self.weight_decay = lr, betas, weight_decay
        self.check(lr >= 0, "lr", "use lr >= 0")

    def init_state(self, name, param):
        return {"exp_avg": torch.zeros_like(param)}

    def update(self, name, param, grad, state, hyper):
        lr, m = hyper["lr"].to(param.dtype), state["exp_avg"]
        direction = torch.sign(self.betas[0] * m + (1 - self.betas[0]) * grad)
        param.mul_(1 - lr * self.weight_decay).sub_(lr * direction)
        m.mul_(self.betas[1]).add_(grad, alpha=1 - self.betas[1])


class LionPlugin:
    @graphopt.hookimpl
    def graphopt_register_methods(self, register):
        register(Lion)


def test_third_party_optimizer_via_register_plugin(mlp64, fresh_plugins) -> None:
    graphopt.register_plugin(LionPlugin(), name="lion-test-plugin")
    info = graphopt.list_methods()["lion-test"]
    assert info.stage == "training" and {o.name for o in info.options} >= {"lr", "groups", "max_grad_norm"}
    data = batches((6, 8), 4)
    reference, initial = copy.deepcopy(mlp64), copy.deepcopy(mlp64)
    lr, (b1, b2), wd = 1e-2, (0.9, 0.99), 0.1
    moments = {p: torch.zeros_like(p) for p in reference.parameters()}
    for x, y in data:  # Lion written from the paper's Algorithm 2 on .grad
        reference.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        with torch.no_grad():
            for p in reference.parameters():
                c = b1 * moments[p] + (1 - b1) * p.grad
                p.copy_(p - lr * (torch.sign(c) + wd * p))
                moments[p] = b2 * moments[p] + (1 - b2) * p.grad
    m = run_graphopt(mlp64, "lion-test(lr=1e-2, weight_decay=0.1, groups={'head.*': {'lr': 1e-2}})", data)
    assert moved(m, initial) > 1e-2
    assert max_diff(m, reference) < 1e-10


# -- the update scheduling pass ---------------------------------------------------------------------------------
def test_updates_follow_their_gradient_and_every_reader_of_the_weight(mlp) -> None:
    m = graphopt.compile(mlp, methods=["adamw"], loss_fn=F.cross_entropy, backend="eager", on_nonfinite="apply")
    m.step(torch.randn(4, 8), torch.tensor([0, 1, 2, 3]))
    gm = m.training_graphs()[0]
    nodes = list(gm.graph.nodes)
    where = {n: i for i, n in enumerate(nodes)}
    placeholders = {n.name: n for n in nodes if n.op == "placeholder"}
    names = list(m.trainable_parameters())
    spans = {}
    for name in names:
        members = [n for n in nodes if update_tag(n) == name]
        assert members and where[members[-1]] - where[members[0]] == len(members) - 1  # contiguous
        spans[name] = (where[members[0]], where[members[-1]])
    # updates come out in backward order, interleaved with the backward pass: head's update precedes the
    # mm that computes encoder.0.weight's gradient
    mms = [n for n in nodes if n.target is torch.ops.aten.mm.default]
    assert spans["head.weight"][1] < where[mms[-1]]
    # aliasing: every node reading a parameter (directly or via a view like aten.t) precedes its in-place update
    for i, name in enumerate(names):
        param = placeholders[f"params_{i + 1}"]
        aliases, frontier = {param}, [param]
        while frontier:
            node = frontier.pop()
            for user in node.users:
                if user.target in (torch.ops.aten.t.default, torch.ops.aten.view.default,
                                   torch.ops.aten.expand.default, torch.ops.aten.detach.default) \
                        and update_tag(user) != name:
                    aliases.add(user)
                    frontier.append(user)
        readers = [u for a in aliases for u in a.users if update_tag(u) != name]
        writes = [n for n in nodes if update_tag(n) == name and param in mutated_inputs(n)]
        assert writes and readers
        assert max(where[r] for r in readers) < min(where[w] for w in writes), name


def test_weight_tying_and_views_stay_correct() -> None:
    """A weight used twice (tied) and through a view after its own gradient's producers: still equals torch."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Linear(6, 10, bias=False)
            self.mid = nn.Linear(10, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.mid(self.emb(x)))
            return h @ self.emb.weight.expand(10, 6)  # the same weight read again, through expand

    torch.manual_seed(0)
    model = Tied().double()
    data = batches((5, 6), 6)
    reference = copy.deepcopy(model)
    run_torch(reference, torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9), data)
    m = run_graphopt(model, "sgd(lr=0.1, momentum=0.9)", data)
    assert max_diff(m, reference) < 1e-10


# -- inductor ---------------------------------------------------------------------------------------------------
def test_adamw_inductor_equals_torch_optim(mlp) -> None:
    data = [(x.float(), y) for x, y in batches((6, 8), 4, n=5)]
    reference = copy.deepcopy(mlp)
    run_torch(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2), data)
    m = run_graphopt(mlp, "adamw(lr=1e-2)", data, backend="inductor")
    assert max_diff(m, reference) < 1e-5
    m.set_lr(1e-3)
    m.step(*data[0])
    assert m.compile_stats().traces == 1


@pytest.mark.parametrize("on_nonfinite", ["raise", "apply"])
def test_sgd_momentum_inductor_equals_torch_optim(mlp, on_nonfinite: str) -> None:
    """The momentum update B ← μB + G fed by the weight gradient's GEMM (``UnfuseCopiedAddmm``), with and
    without the finiteness guard, against torch.optim.SGD."""
    data = [(x.float(), y) for x, y in batches((6, 8), 4, n=5)]
    reference = copy.deepcopy(mlp)
    run_torch(reference, torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, nesterov=True), data)
    m = graphopt.compile(mlp, methods=["sgd(lr=0.1, momentum=0.9, nesterov=True)"], loss_fn=F.cross_entropy,
                         backend="inductor", on_nonfinite=on_nonfinite)
    for x, y in data:
        m.step(x, y)
    assert max_diff(m, reference) < 1e-5
