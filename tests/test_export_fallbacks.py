"""Export fallbacks: when the dynamo ONNX exporter fails, graphopt tries the next exporter path and the
report names the one that wrote the file. ``torch.onnx.export(dynamo=True)`` of the plain HF Swin fails in
its decomposition ("Cannot view a tensor with shape ... and strides"); graphopt's captured graph of T5 and
Swin exports by the first path, and with that path refused, a contiguous copy before each view (an ONNX
``Identity``) exports them too, both checked in onnxruntime. Swin's drop path (stochastic depth in Python
behind ``self.training``) is removed in the inference graph."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn
from zoo import ZOO

import graphopt
from graphopt import export_fallbacks
from graphopt.export_fallbacks import PATHS

pytest.importorskip("transformers")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["t5", "swin"])
def test_t5_and_swin_export_through_the_fallback(name: str, tmp_path) -> None:
    zoo = ZOO[name]
    inputs, _ = zoo.batch(0)
    model = zoo.build(0)
    m = graphopt.compile(model, methods=["lora(r=4)", "adamw(lr=1e-2)"], loss_fn=zoo.loss, backend="eager",
                         example_inputs=inputs)
    m.eval()
    with torch.no_grad():
        expected = model.eval()(**inputs).logits  # lora starts at B = 0: the model itself
        torch.testing.assert_close(m(**inputs).logits, expected, rtol=0, atol=1e-5)  # no drop path in eval
    def refuse(*args, **kwargs):
        raise RuntimeError("Cannot view a tensor with shape (refused for the test)")

    for merge, first in ((True, True), (False, True), (True, False)):
        with pytest.MonkeyPatch.context() as patch:
            if not first:  # the first path refused: the contiguous-views path writes the file
                patch.setattr(export_fallbacks, "PATHS", (("dynamo", refuse), *export_fallbacks.PATHS[1:]))
            report = graphopt.export(m, tmp_path / f"{name}-{merge}-{first}.onnx", merge=merge)
        exporter = "dynamo" if first else "dynamo, contiguous views"
        assert report.exporter == exporter
        assert f"by the {exporter} exporter" in str(report)
        session = onnxruntime.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
        logits = session.run(None, {a.name: inputs[a.name].numpy() for a in session.get_inputs()})[0]
        np.testing.assert_allclose(logits, expected.numpy(), rtol=0, atol=1e-4)


class Failing(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_every_path_is_tried_and_named_when_all_fail(tmp_path, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise RuntimeError("refused for the test")

    m = graphopt.compile(Failing(), methods=["sgd(lr=0.1)"], loss_fn=lambda y, t: y.sum(), backend="eager",
                         example_inputs=(torch.randn(2, 3),))
    monkeypatch.setattr(torch.onnx, "export", refuse)
    failed = r"every exporter path \(nothing was written\):\n  dynamo: RuntimeError: refused"
    with pytest.raises(graphopt.ExportError, match=failed) as err:
        graphopt.export(m, tmp_path / "x.onnx")
    for name, _ in PATHS:
        assert f"  {name}: " in str(err.value)


def test_the_first_path_is_named_when_it_works(tmp_path) -> None:
    m = graphopt.compile(Failing(), methods=["sgd(lr=0.1)"], loss_fn=lambda y, t: y.sum(), backend="eager",
                         example_inputs=(torch.randn(2, 3),))
    assert graphopt.export(m, tmp_path / "x.onnx").exporter == "dynamo"
