"""layerdrop: block discovery, the four schedules against plain-PyTorch references (torch.optim with the
frozen / dropped blocks written out by hand), schedule statistics against the papers' formulas, the
variant-cache bound, seeds and state round trips, stochastic-depth inference scaling, errors."""

from __future__ import annotations

import copy
import itertools
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.builtin.layerdrop import LayerDrop, LayerSchedule, variant_graph
from graphopt.rewrite.blocks import find_blocks
from graphopt.train.step import TrainingStep

DTYPE = torch.float64


# -- models written for the tests ------------------------------------------------------------------------
class ResBlock(nn.Module):
    """x + fc2(relu(fc1(norm(x))))."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.norm(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class ResMLP(nn.Module):
    """stem -> L residual blocks (an nn.Sequential, a container) -> tanh -> batch norm -> head."""

    def __init__(self, blocks: int = 4, d: int = 8, d_in: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Linear(d_in, d)
        self.blocks = nn.Sequential(*[ResBlock(d) for _ in range(blocks)])
        self.bn = nn.BatchNorm1d(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor, skip: frozenset[int] = frozenset(), scale: list[float] | None = None):
        h = self.stem(x)
        for i, block in enumerate(self.blocks):
            if i not in skip:
                h = block(h) if scale is None else h + scale[i] * block.branch(h)
        return self.head(self.bn(torch.tanh(h)))


class Attention(nn.Module):
    def __init__(self, d: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class TransformerLayer(nn.Module):
    """Pre-norm: x + attn(ln1(x)), then + mlp(ln2(.)): two residual adds on one stream."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        if scale is None:
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))
        x = x + scale * self.attn(self.ln1(x))
        return x + scale * self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    def __init__(self, layers: int = 3, d: int = 8, d_in: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.layers = nn.ModuleList([TransformerLayer(d) for _ in range(layers)])
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor, skip: frozenset[int] = frozenset(), scale: list[float] | None = None):
        h = self.embed(x)
        for i, layer in enumerate(self.layers):
            if i not in skip:
                h = layer(h, None if scale is None else scale[i])
        return self.head(h.mean(1))


class BasicBlock(nn.Module):
    """ResNet basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) += x) — an in-place residual add."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        out += x
        return torch.relu(out)


class TinyResNet(nn.Module):
    def __init__(self, blocks: int = 2, c: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.stage = nn.Sequential(*[BasicBlock(c) for _ in range(blocks)])
        self.head = nn.Linear(c, 3)

    def forward(self, x: torch.Tensor, skip: frozenset[int] = frozenset()) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        for i, block in enumerate(self.stage):
            if i not in skip:
                h = block(h)
        return self.head(h.mean((2, 3)))


def make(model_cls=ResMLP, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return model_cls(**kwargs).to(DTYPE)


def data(n: int, shape=(16, 5), classes: int = 3, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=gen, dtype=DTYPE), torch.randint(0, classes, (shape[0],), generator=gen))
            for _ in range(n)]


def compiled(model: nn.Module, layerdrop: str, optimizer: str = "sgd(lr=0.1, momentum=0.9)",
             backend: str = "eager", x: torch.Tensor | None = None) -> graphopt.CompiledModel:
    x = torch.randn(16, 5, dtype=DTYPE) if x is None else x
    return graphopt.compile(model, methods=[layerdrop, optimizer], loss_fn=F.cross_entropy, backend=backend,
                            example_inputs=(x,))


def schedule_of(m: graphopt.CompiledModel) -> LayerSchedule:
    """A schedule equal to the one ``m`` draws from (draws are a function of seed and step)."""
    method = next(x for x in m.methods if isinstance(x, LayerDrop))
    return LayerSchedule(method.schedule, len(m.layerdrop_blocks()), method.seed, method.theta, method.gamma,
                         method.p_last, method.p)


def specialise(m: graphopt.CompiledModel, variant) -> tuple[torch.fx.GraphModule, set[str]]:
    """The forward graph ``m``'s training step builds for ``variant``, and the parameters it leaves untrained."""
    method = next(x for x in m.methods if isinstance(x, LayerDrop))
    paths = [b.path for b in m.layerdrop_blocks()]
    return variant_graph(paths, method.schedule, method.name, m.graph_module, variant)


def block_params(prefix: str, module: nn.Module) -> set[str]:
    return {f"{prefix}.{n}" for n, _ in module.named_parameters()}


# -- block discovery -------------------------------------------------------------------------------------
def test_blocks_of_a_residual_mlp() -> None:
    model = make(blocks=4)
    m = compiled(model, "layerdrop")
    blocks = find_blocks(m.graph_module)
    assert [b.path for b in blocks] == [f"blocks.{i}" for i in range(4)]  # the Sequential is a container
    assert [b.index for b in blocks] == [0, 1, 2, 3]
    assert all(b.module_type == "ResBlock" and len(b.residual_adds) == 1 for b in blocks)
    for i, block in enumerate(blocks):
        assert set(block.parameters) == block_params(f"blocks.{i}", model.blocks[i])
    assert [b.path for b in m.layerdrop_blocks()] == [b.path for b in blocks]
    # block i's output is block i+1's input: the chain of the residual stream
    assert all(a.output == b.input for a, b in itertools.pairwise(blocks))
    text = m.descriptions()["layerdrop"]
    assert "4 blocks" in text and "blocks.3 (ResBlock)" in text


def test_blocks_of_a_transformer_and_a_resnet() -> None:
    x = torch.randn(2, 5, 4, dtype=DTYPE)
    m = graphopt.compile(make(TinyTransformer), methods=["layerdrop"], backend="eager", example_inputs=(x,))
    blocks = find_blocks(m.graph_module)
    assert [b.path for b in blocks] == ["layers.0", "layers.1", "layers.2"]
    assert all(len(b.residual_adds) == 2 for b in blocks)  # attention and MLP sub-layers on one stream
    assert find_blocks(m.graph_module, "layers.*") == blocks  # the glob keeps the outermost matches
    img = torch.randn(2, 3, 6, 6, dtype=DTYPE)
    r = graphopt.compile(make(TinyResNet), methods=["layerdrop"], backend="eager", example_inputs=(img,))
    blocks = find_blocks(r.graph_module)
    assert [b.path for b in blocks] == ["stage.0", "stage.1"]
    gm = r.graph_module
    nodes = {n.name: n for n in gm.graph.nodes}
    for block in blocks:  # the residual add is the in-place `out += x`, never a num_batches_tracked counter
        (add, _), = block.residual_adds
        assert nodes[add].target is torch.ops.aten.add_.Tensor
        assert nodes[block.input] in nodes[add].args
    counters = [n for n in gm.graph.nodes if n.target is torch.ops.aten.add_.Tensor and n.args[0].op == "get_attr"
                and n.args[0].target.endswith("num_batches_tracked")]
    assert counters and not {n.name for n in counters} & {a for b in blocks for a, _ in b.residual_adds}


def test_block_errors(mlp: nn.Module) -> None:
    x = torch.randn(4, 8)
    with pytest.raises(graphopt.OptionError, match=r"layerdrop.*found no residual block.*encoder"):
        graphopt.compile(mlp, methods=["layerdrop"], backend="eager", example_inputs=(x,))
    model = make(blocks=2)
    with pytest.raises(graphopt.OptionError, match=r"blocks pattern 'layer\.\*' matches no module.*blocks\.0"):
        compiled(model, "layerdrop(blocks='layer.*')")
    with pytest.raises(graphopt.OptionError, match=r"names module 'head', which is not a residual block"):
        compiled(model, "layerdrop(blocks='head')")
    m = compiled(model, "layerdrop(blocks=['blocks.1'])")
    assert [b.path for b in m.layerdrop_blocks()] == ["blocks.1"]


@pytest.mark.parametrize("spec, option", [
    ("layerdrop(schedule='random')", "schedule"), ("layerdrop(theta=0.0)", "theta"), ("layerdrop(theta=1.5)", "theta"),
    ("layerdrop(gamma=-1.0)", "gamma"), ("layerdrop(p_last=0.0)", "p_last"), ("layerdrop(p=1.0)", "p"),
    ("layerdrop(p=-0.1)", "p"), ("layerdrop(blocks=[])", "blocks"), ("layerdrop(blocks='')", "blocks"),
    ("layerdrop(seed=1.5)", "seed"),
])
def test_option_errors(spec: str, option: str) -> None:
    with pytest.raises(graphopt.OptionError, match=rf"layerdrop.*{option}"):
        graphopt.compile(make(), methods=[spec])


# -- progressive (Drop-Muon) -----------------------------------------------------------------------------
def frozen_below(model: ResMLP, cutoff: int) -> set[str]:
    """Parameters with no gradient when backward stops at block ``cutoff``: the stem and blocks below it."""
    if cutoff == 0:
        return set()
    names = block_params("stem", model.stem)
    for i in range(cutoff):
        names |= block_params(f"blocks.{i}", model.blocks[i])
    return names


@pytest.mark.parametrize("optimizer, reference", [
    ("sgd(lr=0.1, momentum=0.9, weight_decay=0.01)",
     lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01)),
    ("adamw(lr=0.01)", lambda ps: torch.optim.AdamW(ps, lr=0.01)),
])
def test_progressive_step_equals_torch_with_blocks_frozen(optimizer: str, reference) -> None:
    model = make(blocks=4)
    ref = copy.deepcopy(model)
    opt = reference(ref.parameters())
    m = compiled(model, "layerdrop(schedule='progressive', seed=3)", optimizer)
    if optimizer.partition("(")[0] not in graphopt.list_methods():
        pytest.skip(f"{optimizer} is not available")
    method = schedule_of(m)
    cutoffs = []
    for step, (x, y) in enumerate(data(10), start=1):
        cutoff = method.variant(step) or 0
        cutoffs.append(cutoff)
        frozen = frozen_below(ref, cutoff)
        before = {n: p.detach().clone() for n, p in m.trainable_parameters().items()}
        state_before = {n: {k: v.clone() for k, v in s.items()} for n, s in m.optimizer_state().items()}
        m.step(x, y)
        after = m.trainable_parameters()
        for name in frozen:  # bit-identical, and so is their optimizer state
            assert torch.equal(after[name], before[name]), (step, name)
            for slot, value in state_before.get(name, {}).items():
                assert torch.equal(m.optimizer_state()[name][slot], value), (step, name, slot)
        for name, p in ref.named_parameters():
            p.requires_grad_(name not in frozen)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ref(x), y).backward()
        opt.step()
        ref_params = dict(ref.named_parameters())
        for name, p in after.items():
            torch.testing.assert_close(p, ref_params[name], rtol=0, atol=1e-12, msg=f"step {step} {name}")
        moved = [n for n in after if n not in frozen and not torch.equal(after[n], before[n])]
        assert len(moved) == len(after) - len(frozen)  # every active parameter took a step
    assert len(set(cutoffs)) >= 3 and 0 in cutoffs  # the run covered several cutoffs, the full graph too


def newton_schulz_reference(g: torch.Tensor) -> torch.Tensor:
    """Muon's quintic iteration written from the formula (Jordan et al. 2024)."""
    x = g.t() if g.shape[0] > g.shape[1] else g
    x = x / x.norm()
    for _ in range(5):
        a = x @ x.t()
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    return x.t() if g.shape[0] > g.shape[1] else x


def test_drop_muon_equals_muon_reference_with_blocks_frozen() -> None:
    if "muon" not in graphopt.list_methods():
        pytest.skip("muon is not available")
    model = make(blocks=3)
    ref = copy.deepcopy(model)
    m = compiled(model, "layerdrop(schedule='progressive', seed=5)", "muon(lr=0.02, adamw_lr=0.003)")
    method = schedule_of(m)
    matrices = [p for p in ref.parameters() if p.dim() >= 2]
    buffers = {id(p): torch.zeros_like(p) for p in matrices}
    adam = torch.optim.AdamW([p for p in ref.parameters() if p.dim() < 2], lr=0.003, betas=(0.9, 0.95), eps=1e-8,
                             weight_decay=0.0)
    for step, (x, y) in enumerate(data(8), start=1):
        frozen = frozen_below(ref, method.variant(step) or 0)
        m.step(x, y)
        for name, p in ref.named_parameters():
            p.requires_grad_(name not in frozen)
        adam.zero_grad(set_to_none=True)
        for p in matrices:
            p.grad = None
        F.cross_entropy(ref(x), y).backward()
        adam.step()
        with torch.no_grad():
            for p in matrices:
                if p.grad is None:
                    continue
                buf = buffers[id(p)].mul_(0.95).add_(p.grad)
                p.sub_(0.02 * max(1.0, p.shape[0] / p.shape[1]) ** 0.5 * newton_schulz_reference(p.grad + 0.95 * buf))
        ref_params = dict(ref.named_parameters())
        for name, p in m.trainable_parameters().items():
            torch.testing.assert_close(p, ref_params[name], rtol=0, atol=1e-10, msg=f"step {step} {name}")


# -- dropping schedules ----------------------------------------------------------------------------------
def test_specialised_graph_removes_dropped_branches() -> None:
    model = make(blocks=4)
    ref = copy.deepcopy(model)
    m = compiled(model, "layerdrop(schedule='uniform')")
    x = torch.randn(16, 5, dtype=DTYPE)
    gm, skipped = specialise(m, frozenset({1, 2}))
    torch.testing.assert_close(gm(x), ref(x, skip=frozenset({1, 2})), rtol=0, atol=1e-14)
    assert skipped == block_params("blocks.1", ref.blocks[1]) | block_params("blocks.2", ref.blocks[2])
    stacks = [str(n.meta.get("nn_module_stack")) for n in gm.graph.nodes]
    assert not any("blocks.1" in s or "blocks.2" in s for s in stacks)  # no compute left, no zero masks
    assert sum(n.target is torch.ops.aten.linear.default for n in gm.graph.nodes) == 2 + 2 * 2
    assert not any(n.target is torch.ops.aten.mul.Tensor for n in gm.graph.nodes)
    # the full graph is untouched
    torch.testing.assert_close(m.graph_module(x), ref(x), rtol=0, atol=1e-14)


def test_specialised_transformer_and_resnet_drop_whole_blocks() -> None:
    x = torch.randn(2, 5, 4, dtype=DTYPE)
    model = make(TinyTransformer)
    m = graphopt.compile(copy.deepcopy(model), methods=["layerdrop(schedule='uniform')"], backend="eager",
                         example_inputs=(x,))
    gm, _ = specialise(m, frozenset({0, 2}))
    torch.testing.assert_close(gm(x), model(x, skip=frozenset({0, 2})), rtol=0, atol=1e-14)
    img = torch.randn(2, 3, 6, 6, dtype=DTYPE)
    resnet = make(TinyResNet)
    r = graphopt.compile(copy.deepcopy(resnet), methods=["layerdrop(schedule='uniform')"], backend="eager",
                         example_inputs=(img,))
    gm, skipped = specialise(r, frozenset({0}))
    buffers = {n: b.clone() for n, b in r.graph_module.named_buffers()}
    torch.testing.assert_close(gm(img), resnet(img, skip=frozenset({0})), rtol=0, atol=1e-14)
    assert skipped == block_params("stage.0", resnet.stage[0])
    after = dict(r.graph_module.named_buffers())  # shared with the specialised graph
    assert all(torch.equal(after[n], buffers[n]) for n in buffers if n.startswith("stage.0."))  # dropped: no update
    assert after["stage.1.bn1.num_batches_tracked"].item() == buffers["stage.1.bn1.num_batches_tracked"].item() + 1


@pytest.mark.parametrize("schedule", ["uniform(p=0.5)", "pld(theta=0.3, gamma=0.2)", "stochastic-depth(p_last=0.3)"])
def test_dropping_steps_equal_torch_with_blocks_removed(schedule: str) -> None:
    name, _, options = schedule.partition("(")
    model = make(blocks=4)
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    m = compiled(model, f"layerdrop(schedule={name!r}, seed=11, {options}")
    method = schedule_of(m)
    seen = set()
    for step, (x, y) in enumerate(data(8), start=1):
        dropped = method.variant(step) or frozenset()
        seen.add(dropped)
        before = {n: p.detach().clone() for n, p in m.trainable_parameters().items()}
        state_before = {n: {k: v.clone() for k, v in s.items()} for n, s in m.optimizer_state().items()}
        m.step(x, y)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ref(x, skip=dropped), y).backward()
        opt.step()  # torch.optim skips parameters without a gradient: their state stays as it was
        ref_params = dict(ref.named_parameters())
        for name_, p in m.trainable_parameters().items():
            torch.testing.assert_close(p, ref_params[name_], rtol=0, atol=1e-12, msg=f"step {step} {name_}")
        for i in dropped:
            for pname in block_params(f"blocks.{i}", ref.blocks[i]):
                assert torch.equal(m.trainable_parameters()[pname], before[pname])
                for slot, value in state_before.get(pname, {}).items():
                    assert torch.equal(m.optimizer_state()[pname][slot], value)
    assert len(seen) >= 3


def test_stochastic_depth_inference_scales_branches() -> None:
    model = make(blocks=4)
    ref = copy.deepcopy(model).eval()
    m = compiled(model, "layerdrop(schedule='stochastic-depth', p_last=0.4)")
    x = torch.randn(16, 5, dtype=DTYPE)
    survival = [1 - (depth / 4) * (1 - 0.4) for depth in range(1, 5)]  # Huang et al. 2016, linear decay
    torch.testing.assert_close(m.eval()(x), ref(x, scale=survival), rtol=0, atol=1e-14)
    m.train()
    xt = torch.randn(2, 5, 4, dtype=DTYPE)
    tm = make(TinyTransformer)
    t = graphopt.compile(copy.deepcopy(tm), methods=["layerdrop(schedule='stochastic-depth')"], backend="eager",
                         example_inputs=(xt,))
    survival = [1 - (depth / 3) * 0.5 for depth in range(1, 4)]
    torch.testing.assert_close(t.eval()(xt), tm(xt, scale=survival), rtol=0, atol=1e-14)


def test_stochastic_depth_export_scales_branches(tmp_path) -> None:
    model = make(blocks=3)
    ref = copy.deepcopy(model).eval()
    m = compiled(model, "layerdrop(schedule='stochastic-depth', p_last=0.25)")
    for x, y in data(2):
        m.step(x, y)
    graphopt.export(m, tmp_path / "sd.pt2")
    loaded = torch.export.load(str(tmp_path / "sd.pt2")).module()
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("_graphopt.")})
    x = torch.randn(7, 5, dtype=DTYPE)
    survival = [1 - (depth / 3) * (1 - 0.25) for depth in range(1, 4)]
    torch.testing.assert_close(loaded(x), ref(x, scale=survival), rtol=0, atol=1e-12)


@pytest.mark.parametrize("schedule", ["progressive", "pld", "uniform"])
def test_other_schedules_infer_with_the_full_model(schedule: str) -> None:
    model = make(blocks=3)
    ref = copy.deepcopy(model).eval()
    m = compiled(model, f"layerdrop(schedule={schedule!r})")
    x = torch.randn(16, 5, dtype=DTYPE)
    torch.testing.assert_close(m.eval()(x), ref(x), rtol=0, atol=1e-14)


# -- statistics ------------------------------------------------------------------------------------------
def within(count: float, mean: float, var: float, sigmas: float = 4.0) -> bool:
    return abs(count - mean) <= sigmas * math.sqrt(var) + 1e-9


def ld(schedule: str, blocks: int = 6, **options) -> LayerSchedule:
    return LayerSchedule(schedule, blocks, **options)


def test_progressive_cutoffs_are_uniform() -> None:
    method = ld("progressive", seed=7)
    steps = 6000
    counts = Counter(method.variant(t) or 0 for t in range(1, steps + 1))
    assert set(counts) == set(range(6))
    for cutoff in range(6):
        assert within(counts[cutoff], steps / 6, steps * (1 / 6) * (5 / 6)), counts


def test_pld_keep_rate_follows_theta() -> None:
    theta_bar, gamma, blocks = 0.5, 2e-3, 6
    method = ld("pld", blocks=blocks, theta=theta_bar, gamma=gamma, seed=2)
    for lo, hi in [(1, 500), (500, 1500), (1500, 4000)]:
        kept = mean = var = 0.0
        for t in range(lo, hi):
            theta = (1 - theta_bar) * math.exp(-gamma * (t - 1)) + theta_bar  # Zhang & He 2020
            kept += blocks - len(method.variant(t) or ())
            mean += blocks * theta
            var += blocks * theta * (1 - theta)
        assert within(kept, mean, var), (lo, hi, kept, mean)
    assert method.keep_probabilities(1) == [1.0] * blocks


def test_stochastic_depth_and_uniform_rates() -> None:
    steps, blocks = 4000, 6
    method = ld("stochastic-depth", blocks=blocks, p_last=0.3, seed=4)
    counts = Counter(i for t in range(1, steps + 1) for i in (method.variant(t) or ()))
    for i in range(blocks):
        survive = 1 - ((i + 1) / blocks) * (1 - 0.3)
        assert within(steps - counts[i], steps * survive, steps * survive * (1 - survive)), (i, counts)
    method = ld("uniform", blocks=blocks, p=0.25, seed=4)
    counts = Counter(i for t in range(1, steps + 1) for i in (method.variant(t) or ()))
    for i in range(blocks):
        assert within(counts[i], steps * 0.25, steps * 0.25 * 0.75), (i, counts)
    pairs = sum(1 for t in range(1, steps + 1) if {0, 1} <= (method.variant(t) or set()))
    assert within(pairs, steps * 0.25 ** 2, steps * 0.0625 * 0.9375)  # blocks drop independently


# -- variants, seeds, state ------------------------------------------------------------------------------
def test_progressive_compiles_at_most_one_graph_per_cutoff() -> None:
    m = compiled(make(blocks=3), "layerdrop(schedule='progressive')")
    method = schedule_of(m)
    for x, y in data(15):
        m.step(x, y)
    assert method.num_variants == 3
    stats = m.compile_stats()
    assert stats.traces == len(stats.cached) == 3  # each variant built and traced once
    assert set(stats.cached) == {(), (("layerdrop", 1),), (("layerdrop", 2),)}


def test_variant_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TrainingStep, "max_cached_graphs", 2)
    m = compiled(make(blocks=3), "layerdrop(schedule='uniform', p=0.5)")
    method = schedule_of(m)
    variants = set()
    for step, (x, y) in enumerate(data(10), start=1):
        variants.add(method.variant(step))
        m.step(x, y)
        assert len(m.compile_stats().cached) <= 2
    assert len(variants) > 2 and m.compile_stats().traces >= len(variants)
    assert method.num_variants == 8


def test_seed_reproducibility_and_state_round_trip() -> None:
    batches = data(6)

    def run(seed: int, steps) -> graphopt.CompiledModel:
        m = compiled(make(blocks=2), f"layerdrop(schedule='uniform', p=0.4, seed={seed})")
        for x, y in steps:
            m.step(x, y)
        return m

    a, b, c = run(1, batches), run(1, batches), run(2, batches)
    pa, pb, pc = a.trainable_parameters(), b.trainable_parameters(), c.trainable_parameters()
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert not all(torch.equal(pa[n], pc[n]) for n in pa)
    assert [schedule_of(a).variant(t) for t in range(1, 30)] != [schedule_of(c).variant(t) for t in range(1, 30)]
    # half a run, save, load into a model compiled with another seed, finish: equals the uninterrupted run
    half = run(1, batches[:3])
    saved = half.state_dict()
    assert saved["_graphopt.method.layerdrop.seed"] == 1
    resumed = compiled(make(blocks=2, seed=9), "layerdrop(schedule='uniform', p=0.4, seed=77)")
    resumed.load_state_dict(saved)
    assert resumed.state_dict()["_graphopt.method.layerdrop.seed"] == 1
    for x, y in batches[3:]:
        resumed.step(x, y)
    pr = resumed.trainable_parameters()
    assert all(torch.equal(pa[n], pr[n]) for n in pa)


def test_progressive_with_inductor_matches_eager() -> None:
    batches = data(5)
    models = [compiled(make(blocks=2), "layerdrop(schedule='progressive', seed=1)", backend=b)
              for b in ("eager", "inductor")]
    for m in models:
        for x, y in batches:
            m.step(x, y)
    eager, inductor = (m.trainable_parameters() for m in models)
    for name in eager:
        torch.testing.assert_close(inductor[name], eager[name], rtol=1e-9, atol=1e-11)
    assert models[1].compile_stats().traces <= 2


# -- transformer layers with extra inputs: tiny HF BERT (post-norm) and GPT-2 (pre-norm) ---------------------
# BertLayer(h, mask) = LN(a + FFN(a)) with a = LN(h + Attn(h, mask)); GPT2Block(h, mask) = g + MLP(LN(g)) with
# g = h + Attn(LN(h), mask). Both take the residual stream h plus an attention mask built once outside the
# layers; dropping a layer makes its output its input h (the layer is skipped, as LayerDrop / Drop-Muon do).
def hf_model(name: str):
    """(RealModel, the float64 model, the layers' module-path prefix)."""
    pytest.importorskip("transformers")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from models import MODELS

    rm = MODELS[name]
    return rm, rm.build(0).to(DTYPE), rm.blocks.removesuffix(".*")


def hf_layer_owner(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the transformer layers' ModuleList, and its attribute name."""
    inner = model.model
    return (inner.bert.encoder, "layer") if hasattr(inner, "bert") else (inner.transformer, "h")


class LayersRemoved:
    """``with LayersRemoved(model, {0}):`` runs ``model`` with those layers deleted from its ModuleList."""

    def __init__(self, model: nn.Module, dropped) -> None:
        self.owner, self.attr = hf_layer_owner(model)
        self.full, self.dropped = getattr(self.owner, self.attr), dropped

    def __enter__(self) -> None:
        setattr(self.owner, self.attr, nn.ModuleList([m for i, m in enumerate(self.full) if i not in self.dropped]))

    def __exit__(self, *exc) -> None:
        setattr(self.owner, self.attr, self.full)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_hf_transformer_layers_are_blocks_and_drop_to_the_model_without_them(name: str) -> None:
    rm, model, prefix = hf_model(name)
    x, _ = rm.batch(4, 0)
    m = graphopt.compile(copy.deepcopy(model), methods=["layerdrop(schedule='uniform')"], backend="eager",
                         example_inputs=(x,))
    blocks = m.layerdrop_blocks()
    assert [b.path for b in blocks] == [f"{prefix}.0", f"{prefix}.1"]  # the layers, not attention / MLP parts
    assert [b.module_type for b in blocks] == (["BertLayer"] * 2 if name == "bert" else ["GPT2Block"] * 2)
    assert all(len(b.residual_adds) == 2 and len(b.extras) == 1 for b in blocks)  # two sub-layers; the mask
    assert blocks[0].output == blocks[1].input and blocks[0].extras == blocks[1].extras  # one stream, one mask
    assert find_blocks(m.graph_module, rm.blocks) == blocks
    layers = getattr(*hf_layer_owner(model))
    for i, block in enumerate(blocks):
        assert set(block.parameters) == block_params(f"{prefix}.{i}", layers[i])
    for dropped in (frozenset({0}), frozenset({1}), frozenset({0, 1})):
        gm, skipped = specialise(m, dropped)
        with LayersRemoved(model, dropped), torch.no_grad():
            expected = model(x)
        torch.testing.assert_close(gm(x), expected, rtol=0, atol=1e-12)
        assert skipped == set().union(*(block_params(f"{prefix}.{i}", layers[i]) for i in dropped))
        assert not any(f"{prefix}.{i}" in str(n.meta.get("nn_module_stack")) for n in gm.graph.nodes for i in dropped)
    with torch.no_grad():
        torch.testing.assert_close(m.graph_module(x), model(x), rtol=0, atol=1e-12)  # the full graph is untouched


def hf_step_reference(model: nn.Module, name: str, x, y, loss_fn, opt, cutoff: int = 0, dropped=frozenset()) -> None:
    """One plain-PyTorch AdamW step of the HF model: layers in ``dropped`` deleted; for a progressive cutoff
    ``s``, the embeddings and layers below ``s`` frozen (``requires_grad=False``) and backward stopped at layer
    ``s``'s input (a forward pre-hook detaching it; only GPT-2's tied ``wte``, which is also the LM head, still
    trains, through the head)."""
    owner, attr = hf_layer_owner(model)
    layers = getattr(owner, attr)
    embeddings = model.model.bert.embeddings if name == "bert" else model.model.transformer.wpe
    frozen = {id(p) for i in range(cutoff) for p in layers[i].parameters()}
    if cutoff:
        frozen |= {id(p) for p in embeddings.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    hook = layers[cutoff].register_forward_pre_hook(lambda _, args: (args[0].detach(), *args[1:])) if cutoff else None
    opt.zero_grad(set_to_none=True)
    with LayersRemoved(model, dropped):
        loss_fn(model(x), y).backward()
    opt.step()
    if hook is not None:
        hook.remove()


@pytest.mark.parametrize("name, schedule", [("bert", "progressive"),
                                            pytest.param("gpt2", "progressive", marks=pytest.mark.slow),
                                            ("gpt2", "uniform")])
def test_hf_steps_equal_adamw_with_layers_frozen_or_removed(name: str, schedule: str) -> None:
    rm, model, prefix = hf_model(name)
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.01)
    x0, _ = rm.batch(4, 0)
    m = graphopt.compile(model, methods=[f"layerdrop(schedule={schedule!r}, p=0.5, seed=2)",
                                         "adamw(lr=1e-2, weight_decay=0.01)"],
                         loss_fn=rm.loss_fn, backend="eager", example_inputs=(x0,))
    method = schedule_of(m)
    variants = []
    for step in range(1, 6):
        x, y = rm.batch(4, step)
        variant = method.variant(step)
        variants.append(variant)
        before = {n: p.detach().clone() for n, p in m.trainable_parameters().items()}
        m.step(x, y)
        if schedule == "progressive":
            hf_step_reference(ref, name, x, y, rm.loss_fn, opt, cutoff=variant or 0)
        else:
            hf_step_reference(ref, name, x, y, rm.loss_fn, opt, dropped=variant or frozenset())
        ref_params = dict(ref.named_parameters())
        after = m.trainable_parameters()
        assert after.keys() == ref_params.keys()
        for pname, p in after.items():
            torch.testing.assert_close(p, ref_params[pname], rtol=0, atol=1e-12, msg=f"step {step} {pname}")
        untouched = {n for n in after if torch.equal(after[n], before[n])}
        if schedule == "progressive" and variant:  # cutoff 1: layer 0 and the embeddings stay as they were
            expected = {n for n in after if n.startswith(f"{prefix}.0.")
                        or (".embeddings." in n if name == "bert" else ".wpe." in n)}
            assert untouched == expected
        elif schedule == "uniform":
            assert untouched == {n for n in after for i in (variant or ()) if n.startswith(f"{prefix}.{i}.")}
    assert len(set(variants)) >= 2, variants  # the run covered the full graph and a frozen / dropped variant


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_hf_stochastic_depth_inference_scales_each_sublayer_branch(name: str) -> None:
    # Huang et al. 2016 at test time: each residual add h + f becomes h + p_l·f (for BERT's post-norm layers
    # inside the LayerNorm: LN(h + p_l·f)); the reference scales the HF sub-layers' (p=0) dropout outputs
    rm, model, _ = hf_model(name)
    x, _ = rm.batch(4, 0)
    m = graphopt.compile(copy.deepcopy(model), methods=["layerdrop(schedule='stochastic-depth', p_last=0.4)"],
                         backend="eager", example_inputs=(x,))
    survival = [1 - (depth / 2) * (1 - 0.4) for depth in (1, 2)]
    hooks = []
    for layer, p in zip(getattr(*hf_layer_owner(model)), survival):
        branches = ((layer.attention.output.dropout, layer.output.dropout) if name == "bert"
                    else (layer.attn.resid_dropout, layer.mlp.dropout))
        hooks += [b.register_forward_hook(lambda _, __, out, p=p: p * out) for b in branches]
    with torch.no_grad():
        expected = model.eval()(x)
    torch.testing.assert_close(m.eval()(x), expected, rtol=0, atol=1e-12)
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        assert not torch.allclose(model(x), expected)  # the scaling matters


class PosLayer(nn.Module):
    """h + fc2(gelu(fc1(h + pos))): an extra input ``pos`` of the stream's own shape feeds the branch only."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(F.gelu(self.fc1(h + pos)))


class PosModel(nn.Module):
    def __init__(self, layers: int = 3, d: int = 8) -> None:
        super().__init__()
        self.embed, self.pos = nn.Linear(4, d), nn.Parameter(torch.randn(5, d))
        self.layers = nn.ModuleList([PosLayer(d) for _ in range(layers)])
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor, skip: frozenset[int] = frozenset()) -> torch.Tensor:
        h, pos = self.embed(x), torch.tanh(self.pos).expand(x.shape[0], -1, -1)
        for i, layer in enumerate(self.layers):
            if i not in skip:
                h = layer(h, pos)
        return self.head(h.mean(1))


def test_extra_input_of_the_streams_shape_is_not_taken_for_the_stream() -> None:
    x = torch.randn(2, 5, 4, dtype=DTYPE)
    model = make(PosModel)
    m = graphopt.compile(copy.deepcopy(model), methods=["layerdrop(schedule='uniform')"], backend="eager",
                         example_inputs=(x,))
    blocks = m.layerdrop_blocks()
    assert [b.path for b in blocks] == ["layers.0", "layers.1", "layers.2"]
    assert all(a.output == b.input for a, b in itertools.pairwise(blocks))  # h, not pos, is the stream
    assert len({b.extras for b in blocks}) == 1 and len(blocks[0].extras) == 1 and "extra inputs" in str(blocks[0])
    for dropped in (frozenset({1}), frozenset({0, 2})):
        gm, _ = specialise(m, dropped)
        torch.testing.assert_close(gm(x), model(x, skip=dropped), rtol=0, atol=1e-14)
