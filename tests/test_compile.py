"""graphopt.compile: forward, the captured training step against torch.optim, state, decorators, failures."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from models import MLP
from torch import nn

import graphopt


def batches(n: int, dtype: torch.dtype = torch.float64, batch: int = 6, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 8, generator=gen, dtype=dtype), torch.randint(0, 4, (batch,), generator=gen))
            for _ in range(n)]


def reference_sgd_run(model: nn.Module, data, **options) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), **options)
    losses = []
    for x, y in data:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("options", [
    {"lr": 0.1},
    {"lr": 0.05, "momentum": 0.9},
    {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
])
def test_step_equals_torch_optim_sgd_float64(mlp, options) -> None:
    model = mlp.double()
    reference = copy.deepcopy(model)
    spec = ("sgd", options)
    m = graphopt.compile(model, methods=[spec], loss_fn=F.cross_entropy, backend="eager")
    data = batches(10)
    losses = [m.step(x, y).item() for x, y in data]
    expected = reference_sgd_run(reference, data, **options)
    assert losses == pytest.approx(expected, abs=1e-12)
    params = m.trainable_parameters()
    for name, param in reference.named_parameters():
        torch.testing.assert_close(params[name], param, rtol=0, atol=1e-12)


def test_user_model_is_never_modified(mlp) -> None:
    before = copy.deepcopy(mlp.state_dict())
    m = graphopt.compile(mlp, methods=["sgd(lr=0.5)"], loss_fn=F.cross_entropy, backend="eager")
    for x, y in batches(3, torch.float32):
        m.step(x, y)
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())
    assert not torch.equal(m.trainable_parameters()["head.weight"], mlp.head.weight)


def test_forward_is_differentiable_and_fills_grad(mlp) -> None:
    m = graphopt.compile(mlp, methods=[], backend="eager")
    x = torch.randn(4, 8)
    out = m(x)
    torch.testing.assert_close(out, mlp(x), rtol=0, atol=0)
    out.sum().backward()
    mlp(x).sum().backward()
    params = m.trainable_parameters()
    for name, param in mlp.named_parameters():
        torch.testing.assert_close(params[name].grad, param.grad)


def test_capture_on_first_call_and_new_batch_size(mlp) -> None:
    m = graphopt.compile(mlp, methods=["sgd(lr=0.1)"], loss_fn=F.cross_entropy, backend="eager")
    with pytest.raises(RuntimeError, match="captured on first call"):
        m.graph_module  # noqa: B018
    x, y = batches(1, torch.float32)[0]
    m.step(x, y)
    assert isinstance(m.graph_module, torch.fx.GraphModule)
    m.step(x[:3], y[:3])  # a smaller last batch: the same graph (the batch dim is dynamic)
    m.step(x[:3], y[:3])
    assert m.compile_stats().traces == 1


def test_state_dict_round_trip_continues_identically(mlp) -> None:
    data = batches(8)
    spec = "sgd(lr=0.1, momentum=0.9)"
    straight = graphopt.compile(copy.deepcopy(mlp).double(), methods=[spec], loss_fn=F.cross_entropy, backend="eager")
    for x, y in data:
        straight.step(x, y)
    first = graphopt.compile(copy.deepcopy(mlp).double(), methods=[spec], loss_fn=F.cross_entropy, backend="eager")
    for x, y in data[:4]:
        first.step(x, y)
    saved = first.state_dict()
    assert saved["_graphopt.step"] == 4 and "_graphopt.optim.head.weight.momentum_buffer" in saved
    torch.manual_seed(123)
    resumed = graphopt.compile(MLP().double(), methods=[spec], loss_fn=F.cross_entropy, backend="eager")
    resumed.load_state_dict(saved)  # before capture: applied when the model is captured
    for x, y in data[4:]:
        resumed.step(x, y)
    expected = straight.trainable_parameters()
    for name, param in resumed.trainable_parameters().items():
        torch.testing.assert_close(param, expected[name], rtol=0, atol=0)


def test_load_state_dict_rejects_a_foreign_state(mlp) -> None:
    m = graphopt.compile(mlp, methods=["sgd(lr=0.1)"], example_inputs=(torch.randn(2, 8),), backend="eager")
    with pytest.raises(graphopt.CheckpointError, match="does not fit"):
        m.load_state_dict({"other.weight": torch.zeros(1)})


def test_decorator_forms(mlp) -> None:
    @graphopt.compile(methods=["sgd(lr=0.1)"], loss_fn=F.cross_entropy, backend="eager")
    class Net(MLP):
        pass

    @graphopt.compile(methods=["sgd(lr=0.1)"], loss_fn=F.cross_entropy, backend="eager")
    def make_net() -> nn.Module:
        return MLP()

    instance = graphopt.compile(methods=["sgd(lr=0.1)"], loss_fn=F.cross_entropy, backend="eager")(mlp)
    x, y = batches(1, torch.float32)[0]
    for compiled in (Net(), Net(d_out=4), make_net(), instance):
        assert isinstance(compiled, graphopt.CompiledModel)
        assert torch.isfinite(compiled.step(x, y))
    first, second = Net(), Net()
    assert first.methods[0] is not second.methods[0]  # each compiled model owns its methods
    assert Net.__name__ == "Net" and make_net.__name__ == "make_net"


def test_step_needs_optimizer_and_loss(mlp) -> None:
    x, y = batches(1, torch.float32)[0]
    with pytest.raises(graphopt.OptionError, match="needs an optimizer method"):
        graphopt.compile(mlp, methods=[], loss_fn=F.cross_entropy, backend="eager").step(x, y)
    with pytest.raises(graphopt.StepError, match="needs a loss: the model returned none"):
        graphopt.compile(mlp, methods=["sgd(lr=0.1)"], backend="eager").step(x)
    with pytest.raises(graphopt.InputError, match=r"without loss_fn, m\.step passes every argument to the model"):
        graphopt.compile(mlp, methods=["sgd(lr=0.1)"], backend="eager").step(x, y)


def test_set_lr_changes_the_update_without_retracing(mlp) -> None:
    model = mlp.double()
    reference = copy.deepcopy(model)
    m = graphopt.compile(model, methods=["sgd(lr=0.1)"], loss_fn=F.cross_entropy, backend="eager")
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for i, (x, y) in enumerate(batches(4)):
        lr = 0.1 / (i + 1)
        m.set_lr(lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        m.step(x, y)
        optimizer.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        optimizer.step()
    assert m.compile_stats().traces == 1 and m.lr == pytest.approx(0.025)
    torch.testing.assert_close(m.trainable_parameters()["head.weight"], reference.head.weight, rtol=0, atol=1e-12)
    with pytest.raises(graphopt.OptionError, match="learning rate must be a finite number >= 0"):
        m.set_lr(-1)


class BreaksTheGraph(graphopt.Method):
    """A method whose rewrite leaves a graph that cannot run."""

    name = "breaks-the-graph"
    stage = "forward"

    def apply(self, gm, ctx):
        for layer in ctx.select(None):
            ctx.add_parameter(layer.path, "junk", torch.zeros(3))
            layer.node.update_arg(0, ctx.get_attr(f"{layer.path}.breaks-the-graph_junk", layer.node))


class Raises(graphopt.Method):
    """A method whose rewrite raises."""

    name = "raises"

    def apply(self, gm, ctx):
        raise KeyError("no such node")


class Plugin:
    @graphopt.hookimpl
    def graphopt_register_methods(self, register):
        register(BreaksTheGraph)
        register(Raises)


@pytest.mark.parametrize("spec, message", [
    ("breaks-the-graph", r"method 'breaks-the-graph' \(plugin 'failing-plugin'\) produced a graph that does not run"),
    ("raises", r"method 'raises' \(plugin 'failing-plugin'\) failed in phase 'apply' \(apply\): KeyError"),
])
def test_failed_rewrite_names_method_and_plugin(fresh_plugins, mlp, spec, message) -> None:
    graphopt.register_plugin(Plugin(), name="failing-plugin")
    before = copy.deepcopy(mlp.state_dict())
    with pytest.raises(graphopt.RewriteError, match=message):
        graphopt.compile(mlp, methods=[spec], example_inputs=(torch.randn(2, 8),), backend="eager")
    assert list(mlp.state_dict()) == list(before)
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())
    assert not hasattr(mlp.head, "breaks-the-graph_junk")


def test_eval_mode_turns_dropout_and_batchnorm_to_inference() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 4))
    m = graphopt.compile(model, methods=["sgd(lr=0.1)"], loss_fn=F.cross_entropy, backend="eager")
    for x, y in batches(3, torch.float32):
        m.step(x, y)
    model.load_state_dict(m.graph_module.state_dict())  # the trained weights and running statistics
    model.eval()
    x = torch.randn(5, 8)
    torch.testing.assert_close(m.eval()(x), model(x), rtol=0, atol=1e-6)
    assert m.graph_module.get_submodule("1").num_batches_tracked.item() == 3  # counted in training only
    assert m.train().training


def test_repr_and_extensions_listing(mlp) -> None:
    m = graphopt.compile(mlp, methods=["sgd(lr=0.1, momentum=0.5)"], backend="eager")
    assert "sgd(lr=0.1, momentum=0.5, nesterov=False, weight_decay=0.0" in repr(m)
    with pytest.raises(AttributeError, match="no attribute 'prune'"):
        m.prune  # noqa: B018


def test_inductor_step_matches_eager(mlp) -> None:
    data = batches(3, torch.float32)
    eager = graphopt.compile(copy.deepcopy(mlp), methods=["sgd(lr=0.1, momentum=0.9)"], loss_fn=F.cross_entropy,
                             backend="eager")
    inductor = graphopt.compile(copy.deepcopy(mlp), methods=["sgd(lr=0.1, momentum=0.9)"], loss_fn=F.cross_entropy)
    for x, y in data:
        torch.testing.assert_close(inductor.step(x, y), eager.step(x, y), rtol=1e-5, atol=1e-6)
    expected = eager.trainable_parameters()
    for name, param in inductor.trainable_parameters().items():
        torch.testing.assert_close(param, expected[name], rtol=1e-5, atol=1e-6)
