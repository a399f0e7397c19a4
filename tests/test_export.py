"""Export round trips: .py, .pt2 (reloaded) and .onnx (onnx.checker + onnxruntime), dynamic batch, folding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from test_plugins import SCALE_PLUGIN

import graphopt


@pytest.fixture
def trained(mlp):
    m = graphopt.compile(mlp, methods=["sgd(lr=0.1)"], loss_fn=F.cross_entropy, backend="eager")
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        m.step(torch.randn(6, 8, generator=gen), torch.randint(0, 4, (6,), generator=gen))
    return m.eval()


def test_onnx_round_trip_with_dynamic_batch(trained, tmp_path) -> None:
    path = tmp_path / "model.onnx"
    report = graphopt.export(trained, path, example_inputs=(torch.randn(5, 8),))
    assert report.format == "onnx" and report.max_abs_diff < 1e-5 and "max |Δ|" in str(report)
    onnx.checker.check_model(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        x = torch.randn(batch, 8)
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        np.testing.assert_allclose(out, trained(x).detach().numpy(), rtol=0, atol=1e-5)


def test_pt2_round_trip(trained, tmp_path) -> None:
    path = tmp_path / "model.pt2"
    report = graphopt.export(trained, path, example_inputs=(torch.randn(5, 8),))
    assert report.format == "pt2" and report.max_abs_diff == 0
    loaded = torch.export.load(path).module()
    x = torch.randn(9, 8)
    torch.testing.assert_close(loaded(x), trained(x), rtol=0, atol=0)


def test_python_source_is_readable_fx_code(trained, tmp_path) -> None:
    path = tmp_path / "model.py"
    report = graphopt.export(trained, path)
    text = path.read_text()
    assert report.format == "fx-python" and report.max_abs_diff is None
    assert "sgd(lr=0.1" in text and "def forward" in text and "aten.linear" in text
    compile(text.split("\n", 2)[2], str(path), "exec")  # the code below the header is valid Python


def test_bad_suffix(trained, tmp_path) -> None:
    with pytest.raises(graphopt.ExportError, match=r"use a path ending in one of \.onnx, \.pt2, \.py"):
        graphopt.export(trained, tmp_path / "model.tflite")


def test_merge_folds_adapter_nodes_and_parameters(install_plugin, mlp, tmp_path) -> None:
    install_plugin("toy-scale", "toyscale", "toy_scale", SCALE_PLUGIN)
    x = torch.randn(4, 8)
    m = graphopt.compile(mlp, methods=["scale-inputs(targets=['head', 'encoder.0'], init=1.5)"],
                         example_inputs=(x,), backend="eager").eval()
    with torch.no_grad():
        for _, param in m.trainable_parameters().items():
            param.uniform_(0.5, 2.0)  # non-trivial adapter values
    base_count = sum(p.numel() for p in mlp.parameters())
    merged = tmp_path / "merged.onnx"
    graphopt.export(m, merged, example_inputs=(x,), merge=True)
    unmerged = tmp_path / "unmerged.onnx"
    graphopt.export(m, unmerged, example_inputs=(x,), merge=False)
    py = tmp_path / "merged.py"
    graphopt.export(m, py, merge=True)
    assert "scale_inputs" not in py.read_text() and f"# parameters: {base_count}" in py.read_text()
    for path in (merged, unmerged):
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        np.testing.assert_allclose(out, m(x).detach().numpy(), rtol=0, atol=1e-5)
    model = onnx.load(str(merged))
    assert sum(int(np.prod(t.dims)) for t in model.graph.initializer) == base_count
    assert len(list(m.trainable_parameters().items())) == 2  # exporting does not touch the compiled model's adapters


@pytest.mark.parametrize("atol, rtol", [(1e-4, 1e-5), (0.0, 1e-3), (1e-2, 0.0)])
def test_the_file_check_is_numpy_allclose(atol, rtol) -> None:
    """An exported file passes its check exactly when numpy.allclose(file, pytorch, rtol, atol) holds: the
    float32 rounding of a fold grows with the output's magnitude (MobileNetV2's logits of ~30)."""
    from graphopt.export import Tolerance, _check, _compare

    gen = torch.Generator().manual_seed(0)
    tolerance = Tolerance(atol, rtol)
    outcomes = set()
    for trial in range(200):
        expected = (torch.randn(4, 3, generator=gen) * 10 ** (trial % 5), torch.randn(2, generator=gen))
        noise = 10 ** (-2 - 3 * torch.rand((), generator=gen).item())
        actual = [(e + noise * torch.randn(e.shape, generator=gen)).numpy() for e in expected]
        reference = all(np.allclose(a, e.numpy(), rtol=rtol, atol=atol) for a, e in zip(actual, expected))
        try:
            _check(_compare(expected, actual, tolerance), tolerance, Path("m.onnx"))
            outcomes.add(True)
            assert reference, f"trial {trial}: the check passed a file numpy.allclose rejects"
        except graphopt.ExportError:
            outcomes.add(False)
            assert not reference, f"trial {trial}: the check rejected a file numpy.allclose accepts"
    assert outcomes == {True, False}  # both sides of the bound were exercised
