"""Core bench case "quickstart-sgd": graphopt's compiled training step vs eager PyTorch + torch.optim.SGD.

Model: the quickstart classifier (64 → 128 → 128 → 10, GELU), batch 64, cross-entropy, SGD with
momentum 0.9. Variants, timed side by side: eager model + ``torch.optim.SGD`` (foreach), graphopt
``backend="eager"`` (the traced step graph run op by op) and graphopt with inductor.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.bench import peak_memory_mib, ratios, time_steps

from .common import eager_training_step


def quickstart_model(width: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(64, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 10))


def quickstart_sgd(quick: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    model = quickstart_model()
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    eager = copy.deepcopy(model)
    optimizer = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    eager_step = eager_training_step(eager, optimizer, x, y, F.cross_entropy)

    spec = ["sgd(lr=0.1, momentum=0.9)"]
    traced = graphopt.compile(copy.deepcopy(model), methods=spec, loss_fn=F.cross_entropy, backend="eager")
    compiled = graphopt.compile(copy.deepcopy(model), methods=spec, loss_fn=F.cross_entropy)
    variants = {
        "eager_torch_optim_sgd": eager_step,
        "graphopt_eager_graph": lambda: traced.step(x, y),
        "graphopt_inductor": lambda: compiled.step(x, y),
    }
    times = time_steps(variants, steps=20 if quick else 200, block=5 if quick else 20)
    return {
        "ms_per_step": {k: round(v, 3) for k, v in times.items()},
        "ratio_vs_eager": ratios(times, "eager_torch_optim_sgd"),
        "peak_mib": {name: peak_memory_mib(fn) for name, fn in variants.items()},
    }

