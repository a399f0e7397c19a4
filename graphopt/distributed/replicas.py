"""The data-parallel plan of one compiled model, set up at capture and used by the training step, the
checkpoint and the forward outside the step.

:class:`Replicas` holds the group, ``sharding`` (``"none"``, ``"grad_op"``, ``"full"``), ``bucket_mb``,
``sync_buffers`` and each parameter's :class:`~graphopt.distributed.layout.Shard`. At capture
(:meth:`Replicas.setup`) every parameter and buffer is broadcast from the group's first rank (as DDP does at
construction); with ``full`` each parameter is then cut to this rank's rows, so the model holds about 1/R
of its parameters. Optimizer state is created from the full parameter and split the same way
(:meth:`Replicas.state_for`): the slots the optimizer lays out like the parameter (``Optimizer.row_slots``)
hold this rank's rows, the others are whole on every rank.

Outside the step (eager collectives; every rank must make the same calls, as with FSDP):

- ``m.state_dict()`` gathers to the unsharded layout (:meth:`Replicas.unsharded`), the one a single process
  writes, so a checkpoint loads on any world size; loading cuts it to this rank's rows (:meth:`Replicas.sharded`);
- ``m(x)`` and export run on gathered parameters (:meth:`Replicas.full_parameters`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist

from graphopt.distributed.gathers import place_gathers
from graphopt.distributed.layout import Shard
from graphopt.distributed.step_sync import StepSync
from graphopt.errors import StepError
from graphopt.progress import logger

SHARDINGS = ("none", "grad_op", "full")
OVERLAP = {"reorder_for_compute_comm_overlap": True}  # inductor: move collectives and waits to overlap compute


def broadcast_module(module: torch.nn.Module, group: dist.ProcessGroup) -> None:
    """Copy every parameter and buffer of ``module`` from the group's first rank to the others (in place)."""
    src = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=src, group=group)


def forward_order(gm: torch.fx.GraphModule) -> list[str]:
    """The parameters of ``gm`` in the order the forward graph first uses them (unused ones last)."""
    params = dict(gm.named_parameters())
    order: dict[str, None] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            for name, _ in gm.get_submodule(node.target).named_parameters(prefix=node.target):
                if name in params:
                    order.setdefault(name)
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and arg.target in params:
                order.setdefault(arg.target)
    return [*order, *(n for n in params if n not in order)]


class Replicas:
    """One compiled model's data-parallel plan (see the module docstring)."""

    def __init__(self, group: dist.ProcessGroup, sharding: str, bucket_mb: float, sync_buffers: bool) -> None:
        self.group, self.sharding, self.bucket_mb, self.sync_buffers = group, sharding, bucket_mb, sync_buffers
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.shards: dict[str, Shard] = {}
        self.row_slots: dict[str, frozenset[str]] = {}  # per parameter: its optimizer slots split with it
        self.forward_order: list[str] = []
        self.optimizer: Any = None

    def setup(self, gm: torch.fx.GraphModule, optimizer: Any = None) -> None:
        """At capture: same start on every rank, each parameter's layout, and with ``full`` the shards at rest."""
        broadcast_module(gm, self.group)
        split = self.sharding != "none"
        self.optimizer = optimizer
        self.shards = {n: Shard(tuple(p.shape), self.rank, self.world, self.group, split and p.dim() > 0)
                       for n, p in gm.named_parameters()}
        self.forward_order = forward_order(gm)
        if self.sharding == "full":
            with torch.no_grad():
                for name, param in gm.named_parameters():
                    if self.shards[name].sharded:
                        param.data = self.shards[name].local(param.data)

    # -- the training step ----------------------------------------------------------------------------
    def step_sync(self, gm: torch.fx.GraphModule) -> StepSync:
        """The collectives of a step graph of ``gm``; a parameter a model function replaced is taken as it is
        now when nothing is sharded, and refused otherwise (its rows and optimizer state are laid out already)."""
        if self.sharding == "none":
            self.shards = {n: Shard(tuple(p.shape), self.rank, self.world, self.group, False)
                           for n, p in gm.named_parameters()}
            self.forward_order = forward_order(gm)
        for name, param in gm.named_parameters():
            shard = self.shards.get(name)
            expected = None if shard is None else shard.shard_shape if self.sharding == "full" else shard.shape
            if tuple(param.shape) != expected:
                raise StepError(f"parameter {name!r} was replaced after capture (shape {tuple(param.shape)}; a model "
                                f"function such as sora's prune?): not supported with sharding={self.sharding!r}, "
                                "whose shards and optimizer state are laid out at capture; use sharding='none'")
        return StepSync(self)

    def place_collectives(self, traced: torch.fx.GraphModule, what: str) -> None:
        """After tracing: each parameter gather of ``full`` where FSDP runs it (``place_gathers``)."""
        if self.sharding == "full":
            again = place_gathers(traced)
            logger.info("%s: parameters gathered before use, %d buckets gathered again for the backward", what,
                        again)

    def state_for(self, optimizer: Any, name: str, param: torch.Tensor) -> dict[str, torch.Tensor]:
        """The optimizer's initial state of ``name``, made from the full parameter, its row slots cut to this
        rank's rows."""
        shard = self.shards.get(name)
        if shard is None or not shard.sharded:
            return optimizer.state_for(name, param.detach())
        full = self._gather(shard, param) if self.sharding == "full" else param
        return self._local_slots(name, optimizer.state_for(name, full.detach()), optimizer)

    def _local_slots(self, name: str, slots: Mapping[str, torch.Tensor], optimizer: Any) -> dict[str, torch.Tensor]:
        shard = self.shards[name]
        if not shard.sharded or optimizer is None:
            return dict(slots)
        rows = frozenset(optimizer.rule(name).row_slots(name, shard.shape, slots))
        self.row_slots[name] = rows
        return {k: shard.local(v) if k in rows else v for k, v in slots.items()}

    # -- outside the step -----------------------------------------------------------------------------
    def _gather(self, shard: Shard, block: torch.Tensor) -> torch.Tensor:
        """The full tensor from every rank's ``block`` (an eager all-gather)."""
        out = block.new_empty((self.world * shard.rows_per_rank, *shard.shape[1:]))
        dist.all_gather_into_tensor(out, block.detach().contiguous(), group=self.group)
        return out[:shard.rows].clone()

    @contextlib.contextmanager
    def full_parameters(self, gm: torch.fx.GraphModule, call: bool = False) -> Iterator[None]:
        """With ``full``: the block runs with gathered parameters in ``gm`` (shards again afterwards); ``call``:
        a forward, which cannot take gradients through the gathered copies."""
        if self.sharding != "full":
            yield
            return
        if call and torch.is_grad_enabled():
            raise StepError("with sharding='full' the parameters are shards: m(x) runs on gathered copies, without "
                            "gradients; call it under torch.no_grad() (m.step trains), on every rank")
        params = [(p, self.shards[n]) for n, p in gm.named_parameters() if self.shards[n].sharded]
        blocks = [p.data for p, _ in params]
        try:
            for param, shard in params:
                param.data = self._gather(shard, param.data)
            yield
        finally:
            for (param, _), block in zip(params, blocks):
                param.data = block

    def full_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's full shape, by name."""
        return {n: s.shape for n, s in self.shards.items()}

    def unsharded(self, module_state: dict[str, torch.Tensor], slots: Mapping[str, Mapping[str, torch.Tensor]]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        """A checkpoint's module tensors and optimizer slots in the unsharded layout (gathered)."""
        module_state = dict(module_state)
        if self.sharding == "full":
            for name, value in module_state.items():
                if name in self.shards and self.shards[name].sharded:
                    module_state[name] = self._gather(self.shards[name], value)
        full_slots = {}
        for name, state in slots.items():
            rows = self.row_slots.get(name, frozenset())
            full_slots[name] = {k: self._gather(self.shards[name], v) if k in rows else v for k, v in state.items()}
        return module_state, full_slots

    def sharded(self, module_state: Mapping[str, torch.Tensor], slots: Mapping[str, Mapping[str, torch.Tensor]]
                ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        """An unsharded checkpoint's module tensors and optimizer slots cut to this rank's layout."""
        module_state = dict(module_state)
        if self.sharding == "full":
            for name, value in module_state.items():
                if name in self.shards and self.shards[name].sharded:
                    module_state[name] = self.shards[name].local(value)
        return module_state, {n: self._local_slots(n, s, self.optimizer) for n, s in slots.items()}
