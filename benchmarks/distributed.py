"""Bench case ``distributed``: data-parallel training steps on 2 gloo processes (CPU), side by side with torch.

Model: an MLP of 12 ``Linear(1024, 1024)`` layers (ReLU between), batch 32 per rank, float32, cross-entropy,
AdamW (lr 1e-3). Variants, each timed in every process (interleaved blocks, ``graphopt.bench.time_steps``; rank
0's medians reported):

- ``torch_ddp``: ``torch.nn.parallel.DistributedDataParallel`` (25 MiB buckets) + ``torch.optim.AdamW(fused=True)``;
- ``torch_fully_shard``: torch's FSDP2 (``torch.distributed.fsdp.fully_shard`` on each layer and the model) +
  ``AdamW(fused=True)`` (it runs on CPU with gloo in torch 2.13);
- ``graphopt_none`` / ``graphopt_grad_op`` / ``graphopt_full``: ``graphopt.compile(..., process_group=WORLD,
  sharding=...)``, inductor, the default ``on_nonfinite="raise"`` guard.

Reported per variant: ms per step, the ratio to ``torch_ddp`` (the issue's goal: graphopt_none ≤ 1.0), and the
collectives per step — graphopt's counted in its traced step graph, DDP's with a communication hook (one call
per bucket), FSDP2's with ``CommDebugMode``. ``--quick``: 4 layers of width 256, few steps (a check that the
case runs, not figures). The two processes share the machine's cores: take figures on an idle machine.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

WORLD, BATCH, LR = 2, 32, 1e-3


def make_model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(width, width))
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _adamw_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """torch's side of a step: zero_grad, cross-entropy backward, ``AdamW(fused=True).step()``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def _ddp(width: int, depth: int, x: torch.Tensor, y: torch.Tensor) -> tuple[Callable[[], None], Callable[[], int]]:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(make_model(width, depth))
    calls = [0]

    def counting_hook(state, bucket):  # unannotated: DDP checks the annotations against its classes
        calls[0] += 1
        return allreduce_hook(state, bucket)

    model.register_comm_hook(dist.group.WORLD, counting_hook)
    step = _adamw_step(model, x, y)

    def per_step() -> int:
        calls[0] = 0
        step()
        return calls[0]

    return step, per_step


def _fully_shard(width: int, depth: int, x: torch.Tensor,
                 y: torch.Tensor) -> tuple[Callable[[], None], Callable[[], int]]:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.debug import CommDebugMode

    model = make_model(width, depth)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    step = _adamw_step(model, x, y)

    def per_step() -> int:
        with CommDebugMode() as comm:
            step()
        return comm.get_total_counts()

    return step, per_step


def _graphopt(sharding: str, width: int, depth: int, x: torch.Tensor,
              y: torch.Tensor) -> tuple[Callable[[], None], Callable[[], int]]:
    import graphopt

    m = graphopt.compile(make_model(width, depth), methods=[f"adamw(lr={LR})"], loss_fn=F.cross_entropy,
                         process_group=dist.group.WORLD, sharding=sharding)

    def step() -> None:
        m.step(x, y)

    def per_step() -> int:
        step()
        graph = m.training_graphs()[0]
        return sum(1 for n in graph.graph.nodes if str(n.target).startswith("_c10d_functional.")
                   and "wait_tensor" not in str(n.target))

    return step, per_step


def _worker(quick: bool, out: str) -> None:
    """One process of the case, started by torchrun (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment)."""
    from graphopt.bench import ratios, time_steps

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // WORLD))
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        width, depth = (256, 4) if quick else (1024, 12)
        gen = torch.Generator().manual_seed(1 + rank)  # each rank its own batch
        x, y = torch.randn(BATCH, width, generator=gen), torch.randint(0, width, (BATCH,), generator=gen)
        builders = {"torch_ddp": _ddp, "torch_fully_shard": _fully_shard}
        builders.update({f"graphopt_{s}": functools.partial(_graphopt, s) for s in ("none", "grad_op", "full")})
        variants, collectives, errors = {}, {}, {}
        for name, build in builders.items():
            try:
                step, per_step = build(width, depth, x, y)
                collectives[name] = per_step()  # first call: compiles happen here
                variants[name] = step
            except Exception as err:  # reported, and the others still run (every rank fails alike)
                errors[name] = f"{type(err).__name__}: {err}"
        times = time_steps(variants, steps=6 if quick else 40, warmup=1 if quick else 3, block=2 if quick else 5,
                           progress=False)
        result = {"ms_per_step": {k: round(v, 2) for k, v in times.items()}, "collectives_per_step": collectives,
                  "model": f"{depth}xLinear({width},{width}) batch {BATCH}/rank float32, {WORLD} gloo ranks, "
                           f"threads {torch.get_num_threads()}/rank"}
        if "torch_ddp" in times:
            result["time_vs_torch_ddp"] = ratios(times, "torch_ddp")
            if "graphopt_none" in times:
                result["target_none_le_1.0x_torch_ddp"] = times["graphopt_none"] <= times["torch_ddp"]
        if errors:
            result["errors"] = errors
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def bench_distributed(quick: bool) -> dict[str, Any]:
    """Launch the two processes with ``torchrun`` (this file as the script) and return rank 0's figures."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "result.pt")
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
                   "--master_addr", "127.0.0.1", "--master_port", str(port), __file__, "--out", out]
        subprocess.run([*command, *(["--quick"] if quick else [])], check=True)
        return torch.load(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", required=True)
    arguments = parser.parse_args()
    _worker(arguments.quick, arguments.out)
