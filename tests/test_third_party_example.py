"""The example third-party plugin in examples/third_party_plugin, discovered through its entry point."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from conftest import EXAMPLE_PLUGIN

import graphopt
import graphopt.plugins


def test_entry_point_in_pyproject_matches_the_fixture() -> None:
    text = (EXAMPLE_PLUGIN / "pyproject.toml").read_text()
    assert '[project.entry-points.graphopt]\npeft_extras = "graphopt_peft_extras"' in text


def test_both_methods_are_listed_with_their_distribution(example_plugin) -> None:
    methods = graphopt.list_methods()
    assert (methods["ia3"].plugin, methods["ia3"].stage, [o.name for o in methods["ia3"].options]) == (
        "graphopt-peft-extras", "forward", ["targets"])
    assert [o.name for o in methods["vera"].options] == ["r", "d_init", "targets", "seed"]


def onnx_matches(m: graphopt.CompiledModel, x: torch.Tensor, path) -> None:
    report = graphopt.export(m, path, example_inputs=(x,), merge=True)
    session = onnxruntime.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(out, m(x).detach().numpy(), rtol=0, atol=1e-5)


def test_ia3_forward_training_and_export(example_plugin, mlp, tmp_path) -> None:
    model = mlp.double()
    reference = copy.deepcopy(model)
    x, y = torch.randn(6, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])
    m = graphopt.compile(model, methods=["ia3(targets='head')", "sgd(lr=0.5)"], loss_fn=F.cross_entropy,
                         example_inputs=(x,), backend="eager")
    torch.testing.assert_close(m(x), reference(x), rtol=0, atol=0)  # identity at init
    assert [n for n, _ in m.trainable_parameters().items()] == ["head.ia3_scale"]

    # one step against the formula: y = (h ⊙ l) Wᵀ + b, only l trained
    scale = torch.ones(16, dtype=torch.float64, requires_grad=True)
    hidden = reference.encoder(x).detach()
    loss = F.cross_entropy(F.linear(hidden * scale, reference.head.weight, reference.head.bias), y)
    (grad,) = torch.autograd.grad(loss, scale)
    m.step(x, y)
    torch.testing.assert_close(m.trainable_parameters()["head.ia3_scale"], scale.detach() - 0.5 * grad,
                               rtol=0, atol=1e-12)
    m.eval()
    m.float()
    onnx_matches(m, x.float(), tmp_path / "ia3.onnx")


def test_vera_output_delta_equals_the_formula(example_plugin, mlp, tmp_path) -> None:
    """VeRA (Kopiczko et al. 2024): y = x Wᵀ + b + λ_b ⊙ ((x Aᵀ ⊙ λ_d) Bᵀ), A and B frozen."""
    model = mlp.double()
    reference = copy.deepcopy(model)
    x, y = torch.randn(6, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])
    m = graphopt.compile(model, methods=["vera(r=4, targets='encoder.*')", "sgd(lr=0.5)"], loss_fn=F.cross_entropy,
                         example_inputs=(x,), backend="eager")
    torch.testing.assert_close(m(x), reference(x), rtol=0, atol=0)  # λ_b = 0 at init
    assert sorted(n for n, _ in m.trainable_parameters().items()) == [
        "encoder.0.vera_b", "encoder.0.vera_d", "encoder.2.vera_b", "encoder.2.vera_d"]
    for _ in range(3):
        m.step(x, y)
    gm = m.graph_module

    def branch(path: str, h: torch.Tensor) -> torch.Tensor:
        a, b, d, lb = (gm.get_parameter(f"{path}.vera_{k}") for k in ("A", "B", "d", "b"))
        layer = reference.get_submodule(path)
        return F.linear(h, layer.weight, layer.bias) + lb * (((h @ a.t()) * d) @ b.t())

    hidden = torch.tanh(branch("encoder.2", F.gelu(branch("encoder.0", x))))
    torch.testing.assert_close(m(x), reference.head(hidden), rtol=0, atol=1e-12)
    assert gm.get_parameter("encoder.0.vera_b").abs().sum() > 0  # trained away from zero
    m.eval()
    m.float()
    onnx_matches(m, x.float(), tmp_path / "vera.onnx")


def test_blocked_by_entry_point_name(example_plugin, monkeypatch) -> None:
    monkeypatch.setenv("GRAPHOPT_DISABLE_PLUGINS", "peft_extras")
    graphopt.plugins.reset()
    assert "ia3" not in graphopt.list_methods() and "vera" not in graphopt.list_methods()


def test_unknown_option_names_the_plugin_method(example_plugin) -> None:
    with pytest.raises(graphopt.OptionError, match=r"method 'vera' has no option 'rank'.*r=16"):
        graphopt.compile(methods=["vera(rank=4)"])
