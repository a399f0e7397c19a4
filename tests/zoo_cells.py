"""One cell of the zoo matrix: a zoo model (``tests/zoo.py``) × a method, checked end to end.

A cell captures the model with the method (adapters and tract with ``adamw(lr=1e-2)``; an optimizer alone),
checks that the first training step's loss equals the eager model's loss on the same batch and the same
dropout masks (the eager model draws them from the RNG state the step uses), trains 9 more steps on that
batch and checks that the training loss went down: step 11 runs with the generator state of step 1, so with
the same dropout masks, and its loss must be below step 1's (per-step losses are dominated by the masks when
dropout is heavy, MobileNetV2's 0.8 on four images; eval-mode losses of batch-norm models move with running
statistics of four-image batches), then exports merged and
unmerged ONNX files, each checked by ``graphopt.export`` against PyTorch in onnxruntime (one file when the two
export graphs are the same, as for the optimizers, which have no export passes). Outcomes: ``ok``;
``error`` — a graphopt error (the message names the problem and what to do); ``bug`` — anything else (an
exception from torch, a wrong number).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from zoo import ZooModel

import graphopt
from graphopt.errors import GraphoptError
from graphopt.optim import Optimizer

OPTIMIZERS = ("sgd", "adamw", "muon", "normuon", "adamuon", "adago", "auon", "turbo_muon", "root")
ADAPTERS = ("hra", "oftv2", "sora", "lora", "tract", "layerdrop")
METHODS = OPTIMIZERS + ADAPTERS
STEPS = 10
RNG_KEY = "_graphopt.rng.cpu"  # the step generator's state in CompiledModel.state_dict()
# first-step loss vs eager: float32 rounding on the export path; on the dynamo path the attention dropout of
# scaled_dot_product_attention draws its masks in another kernel than eager's (the same ops with dropout 0
# agree exactly), so the losses agree to ~2e-4
TOLERANCE = {"export": 1e-4, "dynamo": 1e-3}


@dataclass
class Cell:
    """The outcome of one (model, method) cell."""

    model: str
    method: str
    status: str = "ok"
    detail: str = ""
    capture_s: float = 0.0
    first_step_s: float = 0.0
    first_loss: float = float("nan")
    eager_loss: float = float("nan")
    losses: list[float] = field(default_factory=list)  # the training loss of every step
    same_masks_loss: float = float("nan")  # step 11's loss, on step 1's dropout masks


def method_specs(method: str, zoo: ZooModel | None = None) -> list:
    """The methods a cell compiles with: an optimizer alone (sgd with lr=0.1), anything else with AdamW; the
    method's example options, updated by the model's own (``ZooModel.options``)."""
    cls = graphopt.list_methods()[method].cls
    spec = (method, {**cls.example, **(zoo.options.get(method, {}) if zoo else {})})
    return [spec] if issubclass(cls, Optimizer) else [spec, "adamw(lr=1e-2)"]


def run_cell(zoo: ZooModel, method: str, out_dir: Path | None = None, export: bool = True) -> Cell:
    """Run the cell (see the module docstring); never raises for the model's or graphopt's failures."""
    cell = Cell(zoo.name, method)
    try:
        _run(cell, zoo, method, out_dir, export)
    except GraphoptError as err:
        cell.status, cell.detail = "error", f"{type(err).__name__}: {err}"
    except Exception as err:  # a failure graphopt did not explain: a bug
        cell.status, cell.detail = "bug", f"{type(err).__name__}: {err}"
    return cell


def _run(cell: Cell, zoo: ZooModel, method: str, out_dir: Path | None, export: bool) -> None:
    model = zoo.build(0)
    inputs, target = zoo.batch(0)
    reference = copy.deepcopy(model)
    start = time.perf_counter()
    m = graphopt.compile(model, methods=method_specs(method, zoo), loss_fn=zoo.loss, backend="eager",
                         example_inputs=inputs, capture=zoo.capture)
    cell.capture_s = time.perf_counter() - start
    first_state = m.state_dict()[RNG_KEY].clone() if zoo.capture == "export" else None
    if first_state is not None:
        torch.set_rng_state(first_state)  # the eager model draws the step's dropout masks
    rng = torch.get_rng_state()  # the dynamo path draws from the global generator
    start = time.perf_counter()
    cell.first_loss = float(m.step(**inputs, labels=target))
    cell.first_step_s = time.perf_counter() - start
    torch.set_rng_state(rng)
    with torch.no_grad():
        cell.eager_loss = float(zoo.loss(reference.train()(**inputs), target))
    if abs(cell.first_loss - cell.eager_loss) > TOLERANCE[zoo.capture] * (1 + abs(cell.eager_loss)):
        raise AssertionError(f"first-step loss {cell.first_loss:.6f} != eager {cell.eager_loss:.6f}")
    cell.losses = [cell.first_loss] + [float(m.step(**inputs, labels=target)) for _ in range(STEPS - 1)]
    # step 11 on step 1's dropout masks: the export path's step generator, or the global one (dynamo)
    if first_state is not None:
        state = m.state_dict()
        state[RNG_KEY] = first_state
        m.load_state_dict(state)
    torch.set_rng_state(rng)
    cell.same_masks_loss = float(m.step(**inputs, labels=target))
    if not cell.same_masks_loss < cell.first_loss:
        raise AssertionError(f"the training loss did not go down in {STEPS} steps: {cell.same_masks_loss:.4g} on "
                             f"step 1's dropout masks vs {cell.first_loss:.4g} at step 1 (losses {cell.losses})")
    m.eval()
    if export:
        graphs = [m.export_graph(merge).code for merge in (True, False)] if hasattr(m, "export_graph") else []
        # a method without export passes (the optimizers) has one export graph: merged and unmerged are the same
        for merge in (True,) if graphs and graphs[0] == graphs[1] else (True, False):
            path = (out_dir or Path(".")) / f"{zoo.name}-{method}-{'merged' if merge else 'unmerged'}.onnx"
            graphopt.export(m, path, merge=merge)


SYMBOLS = {"ok": "ok", "error": "E", "bug": "BUG"}


def format_matrix(cells: list[Cell], methods: tuple[str, ...] = METHODS) -> str:
    """A markdown table: one row per model (``ok`` / ``E`` clear error / ``BUG``), capture and first-step
    seconds (the model's slowest cell), then the totals."""
    models = list(dict.fromkeys(c.model for c in cells))
    by = {(c.model, c.method): c for c in cells}
    lines = ["| model | " + " | ".join(methods) + " | capture s | first step s |",
             "|---|" + "---|" * (len(methods) + 2)]
    for model in models:
        row = [SYMBOLS[by[(model, m)].status] if (model, m) in by else "" for m in methods]
        mine = [c for c in cells if c.model == model]
        lines.append(f"| {model} | " + " | ".join(row) + f" | {max(c.capture_s for c in mine):.1f} | "
                     f"{max(c.first_step_s for c in mine):.1f} |")
    counts = {status: sum(c.status == status for c in cells) for status in SYMBOLS}
    lines.append("")
    lines.append(f"{len(cells)} cells: {counts['ok']} ok, {counts['error']} clear errors, {counts['bug']} bugs")
    return "\n".join(lines)
