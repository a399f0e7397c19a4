"""The zoo matrix: every built-in method on every zoo architecture (``tests/zoo.py``: 24 ``transformers``
models from their configs, default dropout), each cell checked by ``tests/zoo_cells.py``: capture, the first
step's loss equal to eager PyTorch's, the loss lower after 10 steps, merged and unmerged ONNX files verified
in onnxruntime. A cell is ``ok`` or a clear graphopt error that says what to do; never anything else.

The default suite runs every method on the tiny ResNet (export checked for one of them); the full matrix is
``slow`` and, as it takes about an hour on two cores, also needs
``GRAPHOPT_ZOO_MATRIX=1``: ``GRAPHOPT_ZOO_MATRIX=1 ./test.sh -m slow tests/test_zoo.py``. ``graphopt bench
--only zoo`` prints the matrix.
"""

from __future__ import annotations

import os
import re

import pytest
from zoo import ZOO
from zoo_cells import METHODS, OPTIMIZERS, run_cell

pytest.importorskip("transformers")

# what a clear error of the matrix says to do, by method: every other cell is ok
EXPECTED_ERRORS = {
    "tract": r"first layer in execution order is .*(embed|wte|wpe).*name the layer with layer=",
    "layerdrop": r"not supported on the dynamo path.*capture='export'",
}


def check(cell) -> None:
    if cell.status == "error":
        pattern = EXPECTED_ERRORS.get(cell.method)
        assert pattern is not None, f"{cell.model} × {cell.method}: unexpected error {cell.detail}"
        assert re.search(pattern, cell.detail, re.S), f"{cell.model} × {cell.method}: {cell.detail}"
    else:
        assert cell.status == "ok", f"{cell.model} × {cell.method}: {cell.status}: {cell.detail}"


# the Muon family on the ResNet is slow here: tests/test_contract.py puts every optimizer through the contract
@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m in OPTIMIZERS and m not in (
    "sgd", "adamw", "muon") else m for m in METHODS])
def test_every_method_on_the_zoo_resnet(method: str, tmp_path) -> None:
    cell = run_cell(ZOO["resnet"], method, tmp_path, export=method == "lora")
    assert cell.status == "ok", cell.detail
    assert abs(cell.first_loss - cell.eager_loss) <= 1e-4 * (1 + abs(cell.eager_loss))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("GRAPHOPT_ZOO_MATRIX") != "1", reason="the full zoo matrix (about an hour) runs "
                    "with GRAPHOPT_ZOO_MATRIX=1")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model", list(ZOO))
def test_zoo_matrix(model: str, method: str, tmp_path) -> None:
    check(run_cell(ZOO[model], method, tmp_path))
