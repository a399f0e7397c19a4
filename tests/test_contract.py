"""The method contract, for every registered method: the matrix over ``graphopt.list_methods()`` (the example
third-party plugin included), and the dispatcher's errors in each phase.

Every method, built from its defaults (and ``Method.example`` where an option has none), on a small residual
MLP with dropout on: it captures and passes the graph check, trains (with an optimizer), round-trips
``state_dict`` bit-exactly (the next step too), and exports merged and unmerged ONNX files that onnxruntime
runs to the PyTorch model's outputs.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from conftest import install_example_plugin
from models import ResidualMLP

import graphopt
import graphopt.plugins
from graphopt.optim import Optimizer


def registered_methods() -> list[str]:
    """Every method name registered with the example third-party plugin installed (read at collection)."""
    saved = list(sys.path)
    with tempfile.TemporaryDirectory() as root:
        install_example_plugin(Path(root))
        names = sorted(graphopt.list_methods())
    sys.path[:] = saved
    for module in [m for m in sys.modules if m.startswith("graphopt_peft_extras")]:
        del sys.modules[module]
    graphopt.plugins.reset()
    return names


METHODS = registered_methods()


def spec_of(name: str) -> tuple[str, dict]:
    return name, dict(graphopt.list_methods()[name].cls.example)


def methods_for(name: str) -> list:
    is_optimizer = issubclass(graphopt.list_methods()[name].cls, Optimizer)
    return [spec_of(name)] if is_optimizer else [spec_of(name), "adamw(lr=1e-2)"]


def batch(seed: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(size, 32, generator=gen), torch.randint(0, 4, (size,), generator=gen)


def compiled(name: str, seed: int = 0) -> graphopt.CompiledModel:
    torch.manual_seed(seed)
    return graphopt.compile(ResidualMLP(), methods=methods_for(name), loss_fn=F.cross_entropy, backend="eager",
                            example_inputs=(batch(0)[0],))


def test_the_matrix_covers_built_ins_and_the_third_party_example() -> None:
    assert {"sgd", "adamw", "muon", "hra", "oftv2", "sora", "tract", "layerdrop", "ia3", "vera"} <= set(METHODS)


# The Muon family's variants share the MatrixOptimizer frame (graphopt/optim/matrix.py) with dion, which the
# default suite puts through the contract (with muon); tests/test_optimizer_family.py checks each variant's
# numbers and state. Their own contract runs are slow.
FAMILY = ("normuon", "adamuon", "adago", "auon", "turbo_muon", "root")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in FAMILY else n for n in METHODS])
def test_method_contract(example_plugin, name: str, tmp_path) -> None:
    m = compiled(name)
    m.graph_module.graph.lint()
    assert list(m.trainable_parameters().items()), "a compiled model trains something"
    before = {n: p.detach().clone() for n, p in m.trainable_parameters().items()}
    for step in range(3):
        torch.manual_seed(100 + step)  # dropout masks
        assert torch.isfinite(m.step(*batch(step)))
    assert any(not torch.equal(before[n], p) for n, p in m.trainable_parameters().items())

    # state_dict round trip: bit-exact, and the next step too
    saved = m.state_dict()
    resumed = compiled(name, seed=1)
    resumed.load_state_dict(saved)
    again = resumed.state_dict()
    assert saved.keys() == again.keys()
    for key, value in saved.items():
        assert torch.equal(value, again[key]) if isinstance(value, torch.Tensor) else value == again[key], key
    for model in (m, resumed):
        torch.manual_seed(7)
        model.step(*batch(9))
    expected = m.trainable_parameters()
    assert all(torch.equal(p, expected[n]) for n, p in resumed.trainable_parameters().items())

    # export, merged and unmerged, run in onnxruntime against the PyTorch model in eval mode
    x = batch(11, size=5)[0]
    m.eval()
    reference = m(x).detach().numpy()
    optimizer = issubclass(graphopt.list_methods()[name].cls, Optimizer)
    for merge in (True,) if optimizer else (True, False):  # an optimizer leaves nothing to merge
        report = graphopt.export(m, tmp_path / f"{name}_{merge}.onnx", example_inputs=(x,), merge=merge)
        session = onnxruntime.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        np.testing.assert_allclose(out, reference, rtol=0, atol=1e-5)
    merged = m.export_graph(merge=True)  # adapters folded: a plain model's parameters again
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in ResidualMLP().parameters())


# -- one dispatcher: an error in any phase names the method, its plugin and the phase -----------------------
class Faulty(graphopt.Method):
    """Records one contribution of every kind; the one named by ``fail`` raises."""

    name = "faulty"

    def __init__(self, fail: str = "none") -> None:
        self.fail = fail

    def _maybe(self, where: str) -> None:
        if self.fail == where:
            raise RuntimeError(f"injected in {where}")

    def apply(self, gm, ctx) -> None:
        self._maybe("apply")
        head = ctx.select("head")[0]
        scale = ctx.add_parameter(head.path, "scale", torch.ones(head.in_features))
        from graphopt.rewrite.adapters import fold_input_transforms, insert_input_transform

        insert_input_transform(ctx, head, torch.mul, [scale])
        key = ctx.add_hyperparameter("h", lambda step: self._maybe("hyperparameter") or 1.0)
        ctx.add_loss_term(lambda params, hyper: self._maybe("loss term") or 0.0 * hyper[key])
        ctx.add_post_update([scale], lambda param, hyper: self._maybe("post-update"))
        ctx.add_step_variants(lambda step: self._maybe("variant choice") or ("v" if step > 1 else None),
                              lambda g, v: self._maybe("variant graph") or (g, set()))
        ctx.add_inference_pass(lambda g: self._maybe("inference pass"))
        ctx.add_export_pass(lambda g: self._maybe("export merge") or fold_input_transforms(
            g, torch.mul, lambda w, s: w * s), merge=True)
        ctx.add_export_pass(lambda g: self._maybe("export compact"), merge=False)
        ctx.add_state(lambda: self._maybe("state save") or {"k": 1}, lambda state: self._maybe("state load"))
        ctx.add_model_function("faulty_function", lambda: self._maybe("function"))
        ctx.add_model_function("faulty_misuse", lambda: ctx.add_loss_term(lambda p, h: None))
        if self.fail == "apply misuse":
            ctx.graph_changed()


class FaultyOptimizer(graphopt.optim.Optimizer):
    """SGD whose update raises."""

    name = "faulty-sgd"

    def __init__(self, lr: float = 0.1) -> None:
        self.lr = lr

    def update(self, name, param, grad, state, hyper) -> None:
        raise RuntimeError("injected in update")


class FaultyPlugin:
    @graphopt.hookimpl
    def graphopt_register_methods(self, register):
        register(Faulty)
        register(FaultyOptimizer)


def faulty(fail: str, optimizer: str = "sgd(lr=0.1)") -> graphopt.CompiledModel:
    torch.manual_seed(0)
    return graphopt.compile(ResidualMLP(), methods=[("faulty", {"fail": fail}), optimizer], loss_fn=F.cross_entropy,
                            backend="eager", example_inputs=(batch(0)[0],))


PREFIX = r"method 'faulty' \(plugin 'contract-tests'\) failed in phase "


@pytest.mark.parametrize("fail, error, message, action", [
    ("apply", graphopt.RewriteError, "'apply' \\(apply\\)", None),
    ("hyperparameter", graphopt.StepError, "'step' \\(hyperparameter 'faulty.h'\\)", "step"),
    ("loss term", graphopt.StepError, "'step' \\(loss term\\)", "step"),
    ("post-update", graphopt.StepError, "'step' \\(post-update rule of 'head.faulty_scale'\\)", "step"),
    ("variant choice", graphopt.StepError, "'step' \\(step variant choice\\)", "step"),
    ("variant graph", graphopt.StepError, "'step' \\(variant graph 'v'\\)", "two steps"),
    ("inference pass", graphopt.RewriteError, "'inference' \\(inference pass\\)", "eval"),
    ("export merge", graphopt.ExportError, "'export' \\(export pass, merge=True\\)", "export merged"),
    ("export compact", graphopt.ExportError, "'export' \\(export pass, merge=False\\)", "export compact"),
    ("state save", graphopt.CheckpointError, "'state' \\(state save\\)", "state_dict"),
    ("state load", graphopt.CheckpointError, "'state' \\(state load\\)", "load_state_dict"),
    ("function", graphopt.MethodError, "'function' \\(model function 'faulty_function'\\)", "function"),
])
def test_each_phase_names_method_plugin_and_phase(fresh_plugins, tmp_path, fail, error, message, action) -> None:
    graphopt.register_plugin(FaultyPlugin(), name="contract-tests")
    x, y = batch(1)
    if action is None:
        with pytest.raises(error, match=PREFIX + message + f": RuntimeError: injected in {fail}"):
            faulty(fail)
        return
    m = faulty(fail)
    actions = {
        "step": lambda: m.step(x, y),
        "two steps": lambda: (m.step(x, y), m.step(x, y)),
        "eval": lambda: m.eval()(x),
        "export merged": lambda: graphopt.export(m, tmp_path / "m.onnx", merge=True),
        "export compact": lambda: graphopt.export(m, tmp_path / "m.onnx", merge=False),
        "state_dict": m.state_dict,
        "load_state_dict": lambda: m.load_state_dict(faulty("none").state_dict()),
        "function": m.faulty_function,
    }
    with pytest.raises(error, match=PREFIX + message + f": RuntimeError: injected in {fail}") as caught:
        actions[action]()
    assert (caught.value.method, caught.value.plugin) == ("faulty", "contract-tests")


def test_optimizer_update_errors_name_the_optimizer(fresh_plugins) -> None:
    graphopt.register_plugin(FaultyPlugin(), name="contract-tests")
    m = faulty("none", optimizer="faulty-sgd")
    with pytest.raises(graphopt.StepError, match=r"method 'faulty-sgd' \(plugin 'contract-tests'\) failed in phase "
                                                 r"'step' \(update of '.*'\): RuntimeError: injected in update"):
        m.step(*batch(1))


def test_the_context_refuses_what_its_phase_does_not_allow(fresh_plugins) -> None:
    graphopt.register_plugin(FaultyPlugin(), name="contract-tests")
    with pytest.raises(graphopt.RewriteError, match=r"ctx.graph_changed may only be called inside a model function"):
        faulty("apply misuse")
    m = faulty("none")
    with pytest.raises(graphopt.MethodError, match=r"ctx.add_loss_term may only be called inside the method's apply"):
        m.faulty_misuse()
    assert m.faulty_function() is m  # a model function returning None returns the model
