"""Spawned gloo processes for the data-parallel tests, and the single-process references they are checked against.

A *case* is a dict: ``methods``, the compile options (``sharding``, ``bucket_mb``, ``sync_buffers``,
``on_nonfinite``, ``gradient_accumulation_steps``, ``backend``), the ``model`` kind and the number of ``steps``.
:func:`run_ranks` starts ``world`` processes that run a list of cases one after the other (so one spawn, and one
import of torch per process, serves many cases) and returns each rank's result per case: the unsharded
``state_dict`` (a collective under sharding), the losses, the per-rank bytes of parameters and optimizer state,
and a summary of the collectives of the traced step graph (eager backend). :func:`single_process` trains the
same model on the concatenated batches in one process: the contract's reference.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

import graphopt

sys.path.insert(0, str(Path(__file__).parent))  # models, also in the spawned processes
BATCH = 8  # rows per step, split over the ranks
COLLECTIVES = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "broadcast")


class Sqrt(nn.Module):
    """``x ↦ x √Wᵀ``: with ``W[0, 0] = 0`` the loss is finite and only row 0's gradient is infinite."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(4, 6, dtype=torch.float64) + 0.5)
        with torch.no_grad():
            self.weight[0, 0] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.sqrt().t()


def make_model(kind: str, seed: int) -> nn.Module:
    """``mlp``: dim 0 of its weights (10, 16, 3) not divisible by 4 (padded shards); ``wide``: 32-wide layers
    (shards without padding, for the byte counts); ``bn``: with BatchNorm1d; ``sqrt``: :class:`Sqrt`."""
    torch.manual_seed(seed)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 16), nn.GELU(), nn.Linear(16, 3))
    elif kind == "wide":
        model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))
    elif kind == "bn":
        model = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 3))
    elif kind == "sqrt":
        model = Sqrt()
    elif kind == "residual":  # residual blocks (for checkpoint_blocks), dropout off: the same on every rank
        from models import ResidualMLP

        model = ResidualMLP(d_in=6, width=16, d_out=3, blocks=2, dropout=0.0)
    elif kind == "gpt2":
        from models import tiny_gpt2

        return tiny_gpt2(seed).double()
    else:
        raise ValueError(kind)
    return model.double()


def batches(steps: int, seed: int = 1, classes: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, 6, generator=g, dtype=torch.float64), torch.randint(0, classes, (BATCH,), generator=g))
            for _ in range(steps)]


def case_batches(case: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The case's batches: steps ``start … start + steps − 1`` of one fixed sequence."""
    start, steps = case.get("start", 0), case.get("steps", 4)
    if case.get("model") == "gpt2":
        from models import lm_batch

        return [lm_batch(BATCH, seed) for seed in range(start, start + steps)]
    return batches(start + steps, classes=4 if case.get("model") in ("wide", "sqrt") else 3)[start:]


def loss_of(case: dict) -> Any:
    if case.get("model") == "gpt2":
        from models import lm_loss

        return lm_loss
    return F.cross_entropy


def compile_options(case: dict) -> dict[str, Any]:
    keys = ("sharding", "bucket_mb", "sync_buffers", "gradient_accumulation_steps", "checkpoint_blocks")
    options = {k: case[k] for k in keys if k in case}
    options["on_nonfinite"] = case.get("on_nonfinite", "apply")
    return options


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def collective_summary(graph: torch.fx.GraphModule) -> dict[str, Any]:
    """Counts of each collective in the traced step, and for each gradient reduction whether it comes right
    after its last input (only nodes of its own group in between: issued as soon as its bucket is ready)."""
    nodes = list(graph.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    counts = {c: 0 for c in COLLECTIVES}
    prompt = []
    for node in nodes:
        name = str(node.target).removeprefix("_c10d_functional.").removesuffix(".default")
        if name in counts:
            counts[name] += 1
        if name in ("all_reduce", "reduce_scatter_tensor"):
            tag = (node.meta.get("custom") or {}).get("graphopt_update", "")
            if not tag.startswith("<reduce"):
                continue
            ancestors, stack = set(), list(node.all_input_nodes)
            while stack:
                n = stack.pop()
                if n not in ancestors:
                    ancestors.add(n)
                    stack.extend(n.all_input_nodes)
            outside = [a for a in ancestors if (a.meta.get("custom") or {}).get("graphopt_update") != tag]
            last = max(position[a] for a in outside)
            between = nodes[last + 1:position[node]]
            prompt.append(all((b.meta.get("custom") or {}).get("graphopt_update") == tag for b in between))
    last_mm = max((i for i, n in enumerate(nodes) if str(n.target) == "aten.mm.default"), default=-1)
    first_reduce = next((i for i, n in enumerate(nodes) if str(n.target).endswith(("all_reduce.default",
                                                                                   "reduce_scatter_tensor.default"))
                         ), -1)
    return {"counts": counts, "prompt": prompt, "reduce_before_last_mm": 0 <= first_reduce < last_mm,
            "gathered_for_backward": _gathered_for_backward(nodes)}


VIEWS = {"aten.view.default", "aten.slice.Tensor", "aten.detach.default", "aten.t.default", "aten.split_with_sizes."
         "default", "<built-in function getitem>", "aten.expand.default", "aten.permute.default",
         "aten.transpose.int", "aten._to_copy.default", "aten.unsqueeze.default", "aten.reshape.default"}


def _gathered_for_backward(nodes: list[torch.fx.Node]) -> dict[str, int]:
    """Forward parameter gathers whose full tensors (or views of them) a backward node reads, and gathers
    that run in the backward pass."""
    def backward(node: torch.fx.Node) -> bool:
        return (node.meta.get("custom") or {}).get("graphopt_phase") == "backward"

    leaking = again = 0
    for node in nodes:
        if not str(node.target).endswith("all_gather_into_tensor.default"):
            continue
        if backward(node):
            again += 1
            continue
        seen, stack = set(), [node]
        while stack:
            current = stack.pop()
            for user in current.users:
                if backward(user):
                    leaking += 1
                elif user not in seen and (str(user.target) in VIEWS or "_c10d_functional" in str(user.target)):
                    seen.add(user)
                    stack.append(user)
    return {"forward_values_read_by_backward": leaking, "backward_gathers": again}


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def train_case(case: dict, rank: int, world: int, group: Any) -> dict[str, Any]:
    """One rank's run of ``case`` on its rows of each batch (rank 0's init broadcast at capture); ``load``: a
    checkpoint to start from; ``save``: where rank 0 writes the state dict afterwards."""
    data = case_batches(case)
    rows = BATCH // world
    shard = [(x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]) for x, y in data]
    if "poison" in case:  # non-finite inputs on one rank at one step
        step, poisoned = case["poison"]
        if rank == poisoned:
            shard[step][0][0, 0] = float("nan")
    model = make_model(case.get("model", "mlp"), 100 + rank)  # different per rank: capture broadcasts rank 0's
    m = graphopt.compile(model, methods=case["methods"], loss_fn=loss_of(case), example_inputs=(shard[0][0],),
                         backend=case.get("backend", "eager"), process_group=group, **compile_options(case))
    if "load" in case:
        m.load_state_dict(torch.load(case["load"]))
    losses, errors = [], []
    for x, y in shard:
        try:
            losses.append(m.step(x, y).item())
        except graphopt.StepError as err:
            errors.append(str(err))
    graph = m.training_graphs()[0]
    result = {
        "state": m.state_dict(),  # the unsharded layout (gathered: every rank calls it)
        "losses": losses, "errors": errors, "skipped": m.skipped_steps,
        "param_bytes": _nbytes(m.parameters()),
        "state_bytes": _nbytes(v for slots in m.optimizer_state().values() for v in slots.values()),
        "graph": collective_summary(graph) if case.get("backend", "eager") == "eager" else None,
    }
    if case.get("eval"):  # the forward outside the step (gathers the parameters under sharding="full")
        with torch.no_grad():
            result["eval"] = m.eval()(data[0][0])
        try:
            m(data[0][0])
            result["eval_error"] = None
        except graphopt.StepError as err:
            result["eval_error"] = str(err)
    if "save" in case and rank == 0:
        torch.save(result["state"], case["save"])
    return result


def ddp_runner(case: dict, rank: int, world: int, group: Any) -> dict[str, Any]:
    """graphopt (``sync_buffers=case["sync_buffers"]``) beside torch's DistributedDataParallel
    (``broadcast_buffers`` the same) with ``torch.optim.SGD``, both from rank 0's init, on the same batches."""
    from torch.nn.parallel import DistributedDataParallel

    sync, lr = case["sync_buffers"], 0.1
    data = case_batches(case)
    rows = BATCH // world
    shard = [(x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]) for x, y in data]
    m = graphopt.compile(make_model(case["model"], 100 + rank), methods=[f"sgd(lr={lr})"], loss_fn=F.cross_entropy,
                         backend="eager", process_group=group, sync_buffers=sync, on_nonfinite="apply",
                         example_inputs=(shard[0][0],))
    ddp = DistributedDataParallel(make_model(case["model"], 100 + rank), broadcast_buffers=sync)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=lr)
    for x, y in shard:
        m.step(x, y)
        optimizer.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        optimizer.step()
    ours = {k: v for k, v in m.state_dict().items() if not k.startswith("_graphopt.")}
    return {"graphopt": ours, "ddp": {k: v.detach().clone() for k, v in ddp.module.state_dict().items()},
            "graph": collective_summary(m.training_graphs()[0])}


def _worker(rank: int, world: int, port: int, cases: list[dict], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for index, case in enumerate(cases):
            runner = case.get("runner", train_case)
            try:
                result = runner(case, rank, world, dist.group.WORLD)
            except Exception:  # reported by the test, named by case
                result = {"exception": traceback.format_exc()}
            torch.save(result, Path(out_dir) / f"case{index}-rank{rank}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(cases: list[dict], tmp_path: Path, world: int = 2) -> list[list[dict]]:
    """Each case's results, one dict per rank (a case that raised carries ``exception``)."""
    mp.spawn(_worker, args=(world, free_port(), cases, str(tmp_path)), nprocs=world, join=True)
    return [[torch.load(tmp_path / f"case{i}-rank{r}.pt") for r in range(world)] for i in range(len(cases))]


def single_process(case: dict, load: dict | None = None) -> tuple[graphopt.CompiledModel, list[float]]:
    """The reference: the case's model (rank 0's init) trained in one process on the whole batches (from the
    checkpoint ``load`` when given); the model and its losses."""
    data = case_batches(case)
    if "poison" in case:
        step, poisoned = case["poison"]
        data[step][0][poisoned * (BATCH // case.get("world", 2)), 0] = float("nan")
    options = {k: v for k, v in compile_options(case).items() if k not in ("sharding", "bucket_mb", "sync_buffers")}
    m = graphopt.compile(make_model(case.get("model", "mlp"), 100), methods=case["methods"], loss_fn=loss_of(case),
                         backend="eager", example_inputs=(data[0][0],), **options)
    if load is not None:
        m.load_state_dict(load)
    losses = []
    for x, y in data:
        try:
            losses.append(m.step(x, y).item())
        except graphopt.StepError:
            pass
    return m, losses


def assert_same_state(got: dict, expected: dict, atol: float = 1e-10, slots: bool = True) -> None:
    """Every parameter (and, with ``slots``, optimizer slot and counter) of two state dicts equal to ``atol``."""
    keys = [k for k in expected if slots or not k.startswith("_graphopt.")]
    for key in keys:
        if key.startswith("_graphopt.rng"):
            continue
        want, have = expected[key], got[key]
        if isinstance(want, torch.Tensor):
            torch.testing.assert_close(have, want, rtol=0, atol=atol, msg=key)
        else:
            assert have == want, key
