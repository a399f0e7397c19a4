"""The training-loop options of graphopt.compile, each against its eager PyTorch reference, and the compiled
model as the ``nn.Module`` an ordinary loop uses: a DataLoader with a ragged last batch, torch optimizers
and lr schedulers, nesting, ``.to()``."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from models import MLP
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import graphopt
from graphopt.bench import peak_memory_mib


def data(n: int = 4, batch: int = 6, dtype: torch.dtype = torch.float64, seed: int = 1, d_in: int = 8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, d_in, generator=g, dtype=dtype), torch.randint(0, 4, (batch,), generator=g))
            for _ in range(n)]


def params_close(m: graphopt.CompiledModel, reference: nn.Module, atol: float) -> None:
    ours = dict(m.named_parameters())
    for name, param in reference.named_parameters():
        torch.testing.assert_close(ours[name], param, rtol=0, atol=atol, msg=name)


# -- gradient accumulation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, make", [
    ("sgd(lr=0.1, momentum=0.9)", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
    ("adamw(lr=1e-2)", lambda ps: torch.optim.AdamW(ps, lr=1e-2)),
])
def test_accumulated_micro_batches_equal_one_step_on_their_concatenation(mlp, spec, make) -> None:
    model = mlp.double()
    reference = copy.deepcopy(model)
    optimizer = make(reference.parameters())
    m = graphopt.compile(model, methods=[spec], loss_fn=F.cross_entropy, backend="eager",
                         gradient_accumulation_steps=3)
    micro = data(9, batch=4)
    for k in range(3):  # three updates of three micro-batches each
        chunk = micro[3 * k:3 * k + 3]
        for x, y in chunk:
            m.step(x, y)
        assert m.step_count == k + 1
        optimizer.zero_grad()
        F.cross_entropy(reference(torch.cat([x for x, _ in chunk])), torch.cat([y for _, y in chunk])).backward()
        optimizer.step()
        params_close(m, reference, 1e-6)
    assert m.compile_stats().traces == 2  # one accumulate graph, one update graph


def test_a_checkpoint_taken_mid_accumulation_resumes_exactly(mlp) -> None:
    spec = ("adamw", {"lr": 1e-2})
    micro = data(6, batch=4)
    whole = graphopt.compile(copy.deepcopy(mlp).double(), methods=[spec], loss_fn=F.cross_entropy, backend="eager",
                             gradient_accumulation_steps=3)
    for x, y in micro:
        whole.step(x, y)
    first = graphopt.compile(copy.deepcopy(mlp).double(), methods=[spec], loss_fn=F.cross_entropy, backend="eager",
                             gradient_accumulation_steps=3)
    for x, y in micro[:4]:
        first.step(x, y)
    saved = first.state_dict()
    assert saved["_graphopt.micro"] == 1 and any(k.startswith("_graphopt.accum.") for k in saved)
    resumed = graphopt.compile(MLP().double(), methods=[spec], loss_fn=F.cross_entropy, backend="eager",
                               gradient_accumulation_steps=3, example_inputs=(micro[0][0],))
    resumed.load_state_dict(saved)
    for x, y in micro[4:]:
        resumed.step(x, y)
    expected = dict(whole.named_parameters())
    assert all(torch.equal(p, expected[n]) for n, p in resumed.named_parameters())


# -- mixed precision ------------------------------------------------------------------------------------
def test_bf16_mixed_equals_autocast_and_torch_optim(mlp) -> None:
    reference = copy.deepcopy(mlp)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    m = graphopt.compile(mlp, methods=["adamw(lr=1e-2)"], loss_fn=F.cross_entropy, backend="eager",
                         precision="bf16-mixed")
    for x, y in data(20, dtype=torch.float32):
        loss = m.step(x, y)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = F.cross_entropy(reference(x), y)
        expected.backward()
        optimizer.step()
        assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    params_close(m, reference, 1e-6)
    assert all(p.dtype == torch.float32 for p in m.parameters())  # float32 master weights
    assert all(v.dtype in (torch.float32, torch.float64) for s in m.optimizer_state().values() for v in s.values())


def test_16_mixed_equals_autocast_and_grad_scaler(mlp) -> None:
    """Dynamic loss scaling as torch.amp.GradScaler (init 2^16, x2 after 2000 good steps, x0.5 and skip on
    overflow); a batch scaled 1e6 overflows the float16 backward and must be skipped by both."""
    reference = copy.deepcopy(mlp)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")
    m = graphopt.compile(mlp, methods=["sgd(lr=0.1, momentum=0.9)"], loss_fn=F.cross_entropy, backend="eager",
                         precision="16-mixed")
    batches = data(20, dtype=torch.float32)
    batches[5] = (batches[5][0] * 1e6, batches[5][1])
    for x, y in batches:
        m.step(x, y)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(reference(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    params_close(m, reference, 1e-5)
    assert m.skipped_steps == 1 and m.state_dict()["_graphopt.scaler.scale"].item() == scaler.get_scale()


# -- non-finite steps ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["nan", "empty"])
def test_skip_leaves_parameters_and_optimizer_state_bit_identical(mlp, bad, caplog) -> None:
    m = graphopt.compile(mlp, methods=["adamw(lr=1e-2)"], loss_fn=F.cross_entropy, backend="eager",
                         on_nonfinite="skip")
    x, y = data(1, dtype=torch.float32)[0]
    m.step(x, y)
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in m.state_dict().items()
              if k != "_graphopt.skipped"}
    bad_x, bad_y = (x.clone().index_fill_(0, torch.tensor([2]), float("nan")), y) if bad == "nan" else (x[:0], y[:0])
    with caplog.at_level(logging.WARNING, logger="graphopt"):
        loss = m.step(bad_x, bad_y)
    assert not torch.isfinite(loss) and m.skipped_steps == 1 and "nothing was updated" in caplog.text
    after = m.state_dict()
    assert all(torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k] for k, v in before.items())
    m.step(x, y)
    assert m.step_count == 2  # training goes on


def test_raise_leaves_the_state_untouched_and_apply_poisons_as_torch_optim(mlp) -> None:
    x, y = data(1, dtype=torch.float32)[0]
    nan_x = x.clone().index_fill_(0, torch.tensor([0]), float("nan"))
    m = graphopt.compile(copy.deepcopy(mlp), methods=["adamw(lr=1e-2)"], loss_fn=F.cross_entropy, backend="eager")
    m.step(x, y)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    with pytest.raises(graphopt.StepError, match=r"step 2: the loss \(nan\) or a gradient is not finite; nothing was "
                                                 r"updated \(on_nonfinite='raise'"):
        m.step(nan_x, y)
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters()) and m.step_count == 1
    applied = graphopt.compile(copy.deepcopy(mlp), methods=["adamw(lr=1e-2)"], loss_fn=F.cross_entropy,
                               backend="eager", on_nonfinite="apply")
    applied.step(nan_x, y)
    assert not torch.isfinite(applied.graph_module.head.weight).all()  # as torch.optim would


# -- trainable modules beside adapters (PEFT's modules_to_save) ----------------------------------------------
def test_trainable_globs_keep_a_head_training_beside_adapters(mlp, tmp_path) -> None:
    x, y = data(1, dtype=torch.float32)[0]
    m = graphopt.compile(mlp, methods=["hra(r=2, targets='encoder.*')", "adamw(lr=1e-2)"], loss_fn=F.cross_entropy,
                         backend="eager", trainable=["head"], example_inputs=(x,))
    assert sorted(m.trainable_parameters()) == ["encoder.0.hra_u", "encoder.2.hra_u", "head.bias", "head.weight"]
    head = m.graph_module.head.weight.detach().clone()
    for _ in range(3):
        m.step(x, y)
    assert "head.weight" in m.optimizer_state() and not torch.equal(m.graph_module.head.weight, head)
    assert not m.graph_module.get_submodule("encoder.0").weight.requires_grad
    merged = m.export_graph(merge=True)
    torch.testing.assert_close(merged.head.weight, m.graph_module.head.weight)  # the trained head is exported
    with pytest.raises(graphopt.OptionError, match=r"trainable='classifier' matches no parameter or module"):
        graphopt.compile(MLP(), methods=["hra(r=2)"], trainable="classifier", example_inputs=(x,), backend="eager")


# -- activation checkpointing --------------------------------------------------------------------------------
class ExpandedBlock(nn.Module):
    """A transformer-style MLP block: ``x + dropout(W₂ gelu(W₁ x))`` with a 4× wider hidden layer."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(width, 4 * width), nn.Linear(4 * width, width), nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fc2(F.gelu(self.fc1(x))))


def test_checkpointed_blocks_hold_less_activation_memory_with_the_same_numbers(one_thread) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), *[ExpandedBlock(128) for _ in range(12)], nn.Linear(128, 4))
    x, y = torch.randn(256, 64), torch.randint(0, 4, (256,))
    results = {}
    for checkpoint in (None, True):
        torch.manual_seed(5)
        m = graphopt.compile(copy.deepcopy(model), methods=["sgd(lr=0.05)"], loss_fn=F.cross_entropy,
                             backend="eager", checkpoint_blocks=checkpoint, on_nonfinite="apply")
        m.step(x, y)
        resident = sum(p.numel() * p.element_size() for p in m.parameters()) / 2**20
        results[checkpoint] = (peak_memory_mib(lambda m=m: m.step(x, y)) - resident, m.trainable_parameters())
    full, checkpointed = results[None][0], results[True][0]
    assert checkpointed <= 0.7 * full, (full, checkpointed)  # at least 30% less activation memory
    assert all(torch.equal(results[None][1][n], p) for n, p in results[True][1].items())  # bit-identical steps


# -- an ordinary loop -------------------------------------------------------------------------------------
def test_an_epoch_with_a_ragged_last_batch_then_an_eval_loop_compile_nothing_new() -> None:
    torch.manual_seed(0)
    dataset = TensorDataset(torch.randn(70, 8), torch.randint(0, 4, (70,)))
    m = graphopt.compile(MLP(), methods=["sgd(lr=0.1, momentum=0.9)"], loss_fn=F.cross_entropy)
    for x, y in DataLoader(dataset, batch_size=16, shuffle=True):  # 16, 16, 16, 16, 6
        m.step(x, y)
    m.eval()
    with torch.no_grad():
        for x, _ in DataLoader(dataset, batch_size=32):  # 32, 32, 6
            m(x)
    stats = m.compile_stats()
    assert stats.traces == 1 and stats.compiles == 2  # one training step, one inference graph


def test_own_torch_optimizer_and_lr_scheduler_through_forward_and_backward(mlp) -> None:
    """m(x) + loss.backward() + torch.optim + lr_scheduler, dropout on: equal to the eager model (same masks)."""
    model = nn.Sequential(mlp, nn.Dropout(0.3)).double()
    reference = copy.deepcopy(model)
    batches = data(5)
    m = graphopt.compile(model, backend="eager", example_inputs=(batches[0][0],))  # parameters exist once captured
    runs = []
    for net in (m, reference):
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        torch.manual_seed(3)
        for x, y in batches:
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
            scheduler.step()
        runs.append(dict(net.named_parameters()))
    for name, param in runs[1].items():
        torch.testing.assert_close(runs[0][name], param, rtol=0, atol=1e-12, msg=name)


def test_nn_module_behaviour(mlp) -> None:
    x, y = data(1, dtype=torch.float32)[0]
    m = graphopt.compile(mlp, methods=["hra(r=2)", "adamw(lr=1e-2)"], loss_fn=F.cross_entropy, backend="eager")
    assert isinstance(m, nn.Module)
    with pytest.raises(graphopt.NotCapturedError, match="captured on first call"):
        list(m.parameters())
    m.step(x, y)
    names = dict(m.named_parameters())
    assert {"encoder.0.weight", "encoder.0.hra_u"} <= set(names) and not names["encoder.0.weight"].requires_grad
    parent = nn.ModuleDict({"net": m})
    assert "net.head.hra_u" in dict(parent.named_parameters())  # nested: the adapters are registered
    m.double()
    assert all(p.dtype == torch.float64 for p in m.parameters())
    assert m.optimizer_state()["head.hra_u"]["exp_avg"].dtype == torch.float64
    m.step(x.double(), y)  # the graphs are rebuilt for the new dtype
    m.zero_grad()
    assert not m.eval().training and m.train().training and m.step_count == 2


class InPlaceDropout(nn.Module):
    """MobileNetV2's classifier: ``nn.Dropout(p, inplace=True)`` (``aten.dropout_`` in the captured graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(8, 32), nn.Dropout(0.8, inplace=True), nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.drop(self.fc1(x))))


@pytest.mark.parametrize("methods", [["sgd(lr=0.1)"], ["lora(r=2)", "adamw(lr=1e-2)"]])
def test_in_place_dropout_is_off_in_eval_and_in_the_export(methods, tmp_path) -> None:
    torch.manual_seed(0)
    model, x = InPlaceDropout(), torch.randn(6, 8)
    m = graphopt.compile(model, methods=methods, loss_fn=F.cross_entropy, backend="eager", example_inputs=(x,))
    y = torch.randint(0, 3, (6,))
    train_outputs = {tuple(m.train()(x).flatten().tolist()) for _ in range(3)}
    assert len(train_outputs) > 1  # dropout is on in training
    for _ in range(3):
        m.step(x, y)
    m.eval()
    with torch.no_grad():
        first = m(x)
        torch.testing.assert_close(m(x), first, rtol=0, atol=0)            # deterministic
        torch.testing.assert_close(m(torch.cat([x, x]))[:6], first, rtol=1e-6, atol=1e-6)
        reference = m.merged_module().eval()(x)                           # the user's class in eval mode
    torch.testing.assert_close(first, reference, rtol=1e-5, atol=1e-5)
    graphopt.export(m, tmp_path / "m.onnx")                               # checked in onnxruntime
