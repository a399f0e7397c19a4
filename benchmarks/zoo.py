"""Benchmark case ``zoo``: the model-zoo matrix — every built-in method on every zoo architecture (tiny
random-init ``transformers`` models from their configs, default dropout: ``tests/zoo.py``), each cell run as
the test suite runs it (``tests/zoo_cells.py``: capture, first-step loss equal to eager, loss lower after 10
steps, merged and unmerged ONNX verified in onnxruntime).

Prints the matrix (``ok`` / ``E`` a clear graphopt error / ``BUG``) with the capture and first-step seconds
of each model (its slowest cell: capture + methods applied, and the first ``m.step``, which traces the
training step; ``backend="eager"``), and returns the totals and seconds. ``--quick``: every method on the
tiny ResNet, without export.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1] / "tests"


def bench_zoo(quick: bool) -> dict[str, Any]:
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from zoo import ZOO
    from zoo_cells import METHODS, format_matrix, run_cell

    models = ["resnet"] if quick else list(ZOO)
    cells = []
    with tempfile.TemporaryDirectory() as folder:
        for model in models:
            for method in METHODS:
                cells.append(run_cell(ZOO[model], method, Path(folder), export=not quick))
                for written in Path(folder).glob("*.onnx"):
                    written.unlink()
    print(format_matrix(cells), flush=True)
    result: dict[str, Any] = {status: sum(c.status == status for c in cells) for status in ("ok", "error", "bug")}
    result["capture_s"] = {m: round(max(c.capture_s for c in cells if c.model == m), 2) for m in models}
    result["first_step_s"] = {m: round(max(c.first_step_s for c in cells if c.model == m), 2) for m in models}
    result["not ok"] = {f"{c.model} x {c.method}": c.detail.splitlines()[0][:200] for c in cells if c.status != "ok"}
    return result
