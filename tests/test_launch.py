"""``torchrun --nproc_per_node 2 examples/ddp_train.py`` as docs/distributed.md writes it (gloo on CPU, eager
backend to keep it short): it trains, logs the global loss, and its unsharded checkpoint loads in one process and
gives the logged test accuracy. Also a Dion-vs-Muon convergence run of ``examples/dion_digits.py``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
@pytest.mark.parametrize("sharding, optimizer", [("none", "adamw(lr=3e-3)"), ("full", "dion(lr=0.02, rank=16)")])
def test_torchrun_example(tmp_path: Path, sharding: str, optimizer: str) -> None:
    pytest.importorskip("sklearn")
    checkpoint = tmp_path / "digits.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(EXAMPLES / "ddp_train.py"), "--backend", "eager", "--epochs", "2", "--sharding", sharding,
               "--optimizer", optimizer, "--save", str(checkpoint)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    epochs = re.findall(r"epoch (\d): train loss ([\d.]+), test accuracy ([\d.]+)", done.stdout)
    assert [e[0] for e in epochs] == ["1", "2"]
    assert float(epochs[1][1]) < float(epochs[0][1])
    accuracy = float(epochs[-1][2])
    assert accuracy > 0.85

    sys.path.insert(0, str(EXAMPLES))
    from dion_digits import digits

    _, _, xte, yte = digits()  # the example's split; one process loads the 2-process checkpoint
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))
    m = graphopt.compile(model, methods=[optimizer], loss_fn=F.cross_entropy, backend="eager",
                         example_inputs=(xte[:8],))
    m.load_state_dict(torch.load(checkpoint))
    with torch.no_grad():
        assert (m.eval()(xte).argmax(1) == yte).float().mean().item() == pytest.approx(accuracy, abs=1e-3)


@pytest.mark.slow
def test_dion_converges_on_digits_like_muon() -> None:
    """10 epochs of the same batches: Dion at full rank and at rank 16 reach Muon's test accuracy within 3 points."""
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(EXAMPLES))
    from dion_digits import main

    results = main("eager", epochs=10)
    muon = results["muon"]["test_accuracy"]
    assert muon > 0.9
    for name in ("dion (full rank)", "dion (rank 16)"):
        assert results[name]["test_accuracy"] > muon - 0.03, (name, results)
        assert results[name]["train_loss"] < 0.1, (name, results)
