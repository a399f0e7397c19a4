"""The graphopt command line: methods, show, export, bench."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from graphopt.cli import main


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(textwrap.dedent("""
        import torch.nn as nn

        def mlp():
            return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))

        def cnn():
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 2))
    """))
    return path


def test_methods_table(capsys) -> None:
    assert main(["methods", "-v"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["name", "stage", "plugin", "options"]
    assert "sgd" in out and "training" in out and "lr, momentum=0.0, nesterov=False, weight_decay=0.0" in out


def test_show_prints_graph_and_diff(model_file, capsys) -> None:
    assert main(["show", f"{model_file}:cnn", "-m", "sgd(lr=0.1)", "--input-shape", "2,3,32,32"]) == 0
    out = capsys.readouterr().out
    assert "captured with torch.export" in out and "aten.conv2d" in out and "trainable parameters: 7314" in out


def test_export_writes_checked_onnx(model_file, tmp_path, capsys) -> None:
    target = tmp_path / "out.onnx"
    assert main(["export", f"{model_file}:mlp", "-m", "sgd(lr=0.1)", "-o", str(target)]) == 0
    assert target.exists() and "max |Δ| vs PyTorch" in capsys.readouterr().out


def test_errors_are_one_clear_line(model_file, capsys) -> None:
    assert main(["show", f"{model_file}:mlp", "-m", "sdg(lr=0.1)"]) == 2
    assert "error: unknown method 'sdg'; did you mean 'sgd'" in capsys.readouterr().err
    assert main(["show", f"{model_file}:nope"]) == 2
    assert "has no attribute 'nope'" in capsys.readouterr().err
    assert main(["show", str(model_file)]) == 2
    assert "must look like MODULE:FACTORY" in capsys.readouterr().err


def test_console_script_and_bench_json(tmp_path) -> None:
    cases = tmp_path / "tiny_cases"
    cases.mkdir()
    (cases / "__init__.py").write_text(textwrap.dedent("""
        import graphopt

        @graphopt.hookimpl
        def graphopt_bench_cases(register):
            register("tiny", lambda quick: {"quick": quick, "ratio": 1.0})
    """))
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "graphopt.cli", "bench", "--quick", "--cases", str(cases),
                             "--only", "tiny", "--json", str(out)], capture_output=True, text=True, check=True)
    assert f"wrote {out}" in result.stdout
    saved = json.loads(out.read_text())
    tiny = saved["cases"]["tiny"]
    assert (tiny["quick"], tiny["ratio"], tiny["plugin"]) == (True, 1.0, "graphopt_benchmarks_tiny_cases")
    assert saved["quick"] is True and list(saved["cases"]) == ["tiny"]
    assert saved["torch"].startswith("2.13")


def test_export_with_a_dynamic_sequence_dim(tmp_path, capsys) -> None:
    path = tmp_path / "seq.py"
    path.write_text(textwrap.dedent("""
        import torch.nn as nn

        class TokenModel(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = nn.Embedding(50, 8)
                self.fc = nn.Linear(8, 3)

            def forward(self, ids):
                return self.fc(self.embed(ids)).mean(1)

        def tokens():
            return TokenModel()
    """))
    target = tmp_path / "seq.onnx"
    argv = ["export", f"{path}:tokens", "--input-shape", "2,5", "--input-dtype", "int64", "--high", "50",
            "-o", str(target)]
    assert main([*argv, "--dynamic-dims", "0,1"]) == 0
    import onnxruntime
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    assert [isinstance(d, str) for d in session.get_inputs()[0].shape] == [True, True]  # batch and sequence
    assert "max |Δ| vs PyTorch" in capsys.readouterr().out
    assert main([*argv, "--dynamic-dims", "0,7"]) == 2
    assert "dim 7 is out of range" in capsys.readouterr().err
