"""The dynamo path: models ``torch.export`` cannot capture (data-dependent Python control flow, graph breaks)
train through ``torch.compile`` with graphopt's backend; ``torch.compile(model, backend=graphopt.backend(...))``
for users who compile themselves."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.builtin.lora import lora_delta


class Branchy(nn.Module):
    """``if h.sum() > 0`` on a tensor: torch.export and symbolic_trace both refuse it; dynamo breaks the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(8, 16), nn.Linear(16, 3), nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if h.sum() > 0:
            h = h * 2
        return self.fc2(self.drop(torch.relu(h)))


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 8, generator=g), torch.randint(0, 3, (6,), generator=g)


def test_the_capture_error_points_to_the_dynamo_path() -> None:
    with pytest.raises(graphopt.CaptureError, match=r"capture='dynamo'"):
        graphopt.compile(Branchy(), methods=["adamw"], loss_fn=F.cross_entropy, example_inputs=(data()[0],))


def test_dynamo_path_trains_with_a_fused_optimizer_equal_to_torch_optim() -> None:
    """adamw on the dynamo path: every update (one compiled function) equals torch.optim.AdamW on the eager
    model, step by step, with the same dropout masks."""
    torch.manual_seed(0)
    model = Branchy().double()
    x, y = data()
    x = x.double()
    m = graphopt.compile(model, methods=["adamw(lr=1e-2)"], loss_fn=F.cross_entropy, capture="dynamo",
                         backend="aot_eager", example_inputs=(x,))
    reference = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    for step in range(3):
        torch.manual_seed(step)
        loss = m.step(x, y)
        torch.manual_seed(step)
        optimizer.zero_grad()
        expected = F.cross_entropy(reference(x), y)
        expected.backward()
        optimizer.step()
        assert float(loss) == pytest.approx(float(expected), abs=1e-12), step
    for name, param in reference.named_parameters():
        torch.testing.assert_close(m.trainable_parameters()[name], param, rtol=0, atol=1e-12)


def test_forward_methods_on_every_subgraph_and_export(tmp_path) -> None:
    """sora on the layers of both subgraphs (either side of the break) trains; its proximal gate step runs
    after each update (ξ·lr = 100·0.01 > |g| = 1 zeroes every gate in one step); export re-captures the eval
    model (its branch on h.sum() is still data-dependent: a clear error)."""
    x, y = data()
    torch.manual_seed(0)
    m = graphopt.compile(Branchy(), methods=["sora(r=2)", "adamw(lr=1e-2)"], loss_fn=F.cross_entropy,
                         capture="dynamo", backend="eager", example_inputs=(x,))
    assert sorted(m.trainable_parameters()) == [f"fc{i}.sora_{p}" for i in (1, 2) for p in ("A", "B", "gate")]
    first = float(m.step(x, y))
    for _ in range(9):
        last = float(m.step(x, y))
    assert last < first
    torch.manual_seed(0)
    m = graphopt.compile(Branchy(), methods=["sora(r=2, sparse_lambda=100)", "adamw(lr=1e-2)"],
                         loss_fn=F.cross_entropy, capture="dynamo", backend="eager", example_inputs=(x,))
    m.step(x, y)
    gates = [p for n, p in m.trainable_parameters().items() if n.endswith("gate")]
    assert len(gates) == 2 and all(bool((g == 0).all()) for g in gates)
    with pytest.raises(graphopt.ExportError, match=r"eval-mode forward cannot be captured"):
        graphopt.export(m.eval(), tmp_path / "branchy.onnx")


def test_training_stage_methods_are_refused_on_the_dynamo_path() -> None:
    with pytest.raises(graphopt.OptionError, match=r"'layerdrop'.*not supported on the dynamo path"):
        graphopt.compile(Branchy(), methods=["layerdrop", "adamw"], loss_fn=F.cross_entropy, capture="dynamo")
    with pytest.raises(graphopt.OptionError, match=r"'adamw'.*training-stage.*capture='dynamo'"):
        graphopt.backend(methods=["adamw"])


def test_torch_compile_with_the_graphopt_backend() -> None:
    """torch.compile(model, backend=graphopt.backend(methods=["lora(r=2)"], model=model)): each subgraph's
    linear layer gets its branch; the output is the model with W + s·B A (B set non-zero here); the adapters
    are backend.parameters() and train with a torch.optim optimizer."""
    torch.manual_seed(0)
    model = Branchy().eval()
    reference = copy.deepcopy(model)
    gb = graphopt.backend(methods=["lora(r=2, alpha=4)"], model=model)
    compiled = torch.compile(model, backend=gb)
    x, y = data()
    compiled(x)
    adapters = dict(gb.named_parameters())
    assert sorted(adapters) == ["fc1.lora_A", "fc1.lora_B", "fc2.lora_A", "fc2.lora_B"]
    with torch.no_grad():
        for name, param in adapters.items():
            if name.endswith("lora_B"):
                param.normal_()
        for layer in ("fc1", "fc2"):
            linear = reference.get_submodule(layer)
            delta = lora_delta(torch.eye(linear.in_features), adapters[f"{layer}.lora_A"],
                               adapters[f"{layer}.lora_B"], scale=2.0)
            linear.weight.add_(delta.t())
        torch.testing.assert_close(compiled(x), reference(x), rtol=0, atol=1e-5)
    assert not any(p.requires_grad for p in model.parameters())  # base weights frozen, adapters train
    optimizer = torch.optim.SGD(gb.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in adapters.items()}
    F.cross_entropy(compiled(x), y).backward()
    optimizer.step()
    assert all(not torch.equal(before[n], p) for n, p in adapters.items())


def test_models_of_one_class_do_not_share_compiled_subgraphs() -> None:
    """Ten models of one class on the dynamo path in one process, past dynamo's recompile limit (8 per code
    object): each model computes with its own weights and trains its own adapters. Dynamo guards an inlined
    module by its class, so a cache shared between the models would run an earlier model's subgraphs (its
    backend, tensors and adapters); each compiled model has its own cache region."""
    x, y = data()
    for seed in range(10):
        torch.manual_seed(seed)
        model = Branchy()
        plain = graphopt.compile(model, methods=["sgd(lr=0.5)"], loss_fn=F.cross_entropy, capture="dynamo",
                                 backend="eager", example_inputs=(x,))
        adapted = graphopt.compile(model, methods=["lora(r=2)", "sgd(lr=0.5)"], loss_fn=F.cross_entropy,
                                   capture="dynamo", backend="eager", example_inputs=(x,))
        for _ in range(2):
            plain.step(x, y)
            adapted.step(x, y)
        reference = copy.deepcopy(model).eval()
        for name, param in plain.trainable_parameters().items():
            reference.get_parameter(name).data.copy_(param)
        with torch.no_grad():
            torch.testing.assert_close(plain.eval()(x), reference(x), rtol=0, atol=1e-6, msg=f"model {seed}")
        lora_b = [p for n, p in adapted.trainable_parameters().items() if "lora_B" in n]
        assert lora_b and all(p.abs().sum() > 0 for p in lora_b), f"model {seed}: its own adapters trained"


def test_a_subgraph_called_with_other_tensors_gets_its_own_graph() -> None:
    """Dynamo can run one cache entry for the parameters of several modules (every instance of a layer class:
    wav2vec2's encoder layers); the backend then rewrites the subgraph for the tensors of the call. Here a
    parameter replaced after compiling: the output is computed with the new one."""
    x = data()[0]
    torch.manual_seed(0)
    model = Branchy().eval()
    compiled = torch.compile(model, backend=graphopt.backend(methods=["lora(r=2)"], model=model))
    torch.testing.assert_close(compiled(x), model(x))  # lora's B starts at zero
    with torch.no_grad():
        model.fc2.weight = nn.Parameter(model.fc2.weight.detach() * 2)
    torch.testing.assert_close(compiled(x), model(x))
