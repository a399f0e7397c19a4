"""Capture: torch.export first, symbolic_trace as fallback, a clear error when both fail."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphopt
from graphopt.capture import capture
from graphopt.rewrite.layers import layer_calls


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # Python control flow on a tensor value: neither capture path can follow it
            return self.fc(x)
        return -x


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1, dilation=1, groups=3)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_export_path_keeps_real_parameters_and_dynamic_batch(mlp) -> None:
    gm = capture(mlp, (torch.randn(5, 8),))
    assert gm.meta["graphopt_capture"] == "torch.export"
    names = dict(gm.named_parameters())
    assert set(names) == {n for n, _ in mlp.named_parameters()}
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in names.values())
    assert all(names[n] is not p for n, p in mlp.named_parameters())  # a copy: the user's model is not shared
    x = torch.randn(3, 8)
    torch.testing.assert_close(gm(x), mlp(x), rtol=0, atol=0)
    assert [layer.path for layer in layer_calls(gm)] == ["encoder.0", "encoder.2", "head"]


def test_symbolic_trace_fallback_is_normalised(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise RuntimeError("export refused for the test")

    monkeypatch.setattr(torch.export, "export", refuse)
    torch.manual_seed(0)
    model = ConvNet()
    x = torch.randn(2, 3, 8, 8)
    gm = capture(model, (x,))
    assert gm.meta["graphopt_capture"] == "symbolic_trace"
    assert "export refused" in gm.meta["graphopt_export_error"]
    calls = layer_calls(gm)
    assert [(c.path, c.kind, c.in_features, c.out_features) for c in calls] == [
        ("conv", "conv2d", 1 * 3 * 3, 6), ("fc", "linear", 96, 5)]
    assert not any(n.op == "call_module" for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-6)


def test_both_paths_failing_names_both_reasons() -> None:
    with pytest.raises(graphopt.CaptureError) as info:
        capture(DataDependent(), (torch.randn(2, 4),))
    message = str(info.value)
    assert "cannot capture DataDependent" in message
    assert "torch.export (strict=False) failed" in message and "torch.fx.symbolic_trace failed" in message


def test_compile_surfaces_capture_error_and_leaves_model_alone() -> None:
    model = DataDependent()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(graphopt.CaptureError):
        graphopt.compile(model, methods=["sgd(lr=0.1)"], example_inputs=(torch.randn(2, 4),))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_inputs_the_forward_does_not_take_are_named(mlp) -> None:
    with pytest.raises(graphopt.InputError, match=r"MLP.forward does not take the inputs \(float32\[2, 8\], "
                                                  r"float32\[2\]\)"):
        capture(mlp, (torch.randn(2, 8), torch.randn(2)))


def test_non_module_is_rejected() -> None:
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        capture(lambda x: x, (torch.randn(2),))


class TrainingBranch(nn.Module):
    """A Python ``self.training`` branch torch.export records as taken; outputs scaled by ``scale``."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.fc, self.scale = nn.Linear(8, 4), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if self.training:
            y = y * 2
        return y * self.scale


@pytest.mark.parametrize("scale", [1.0, 1e-26])
def test_an_unswitchable_training_branch_is_reported_at_any_output_scale(caplog, scale: float) -> None:
    """``m.eval()`` cannot equal the model's eval mode here; the capture says so, also when a random-init
    model's outputs are tiny (MobileNetV2's logits are ~1e-26: an absolute bound saw nothing)."""
    torch.manual_seed(0)
    m = graphopt.compile(TrainingBranch(scale), methods=["sgd(lr=0.1)"], backend="eager",
                         example_inputs=(torch.randn(3, 8),))
    with caplog.at_level("WARNING", logger="graphopt"):
        m(torch.randn(3, 8))
    assert "self.training` branch graphopt cannot switch" in caplog.text
    caplog.clear()
    torch.manual_seed(0)
    plain = graphopt.compile(nn.Sequential(nn.Linear(8, 4)), methods=["sgd(lr=0.1)"], backend="eager",
                             example_inputs=(torch.randn(3, 8) * scale,))
    with caplog.at_level("WARNING", logger="graphopt"):
        plain(torch.randn(3, 8) * scale)
    assert "cannot switch" not in caplog.text
