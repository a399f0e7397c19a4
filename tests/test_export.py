"""Export round trips: .py, .pt2 (reloaded) and .onnx (onnx.checker + onnxruntime), dynamic batch, folding."""

from __future__ import annotations

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
