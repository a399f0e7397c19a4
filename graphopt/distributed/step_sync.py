"""The collectives of one traced training step of a data-parallel model (what ``build_step_function`` calls).

In step order, for ``R`` ranks (every collective a functional one, traced into the step graph):

1. ``sync_buffers=True``: every buffer is overwritten with the group's first rank's (one broadcast per dtype),
   as DDP does before each forward.
2. ``sharding="full"``: each bucket of parameter shards is all-gathered (one collective per bucket, in the
   order of the forward's first use) into full tensors; the trainable ones become the leaves the gradient
   is taken for. :func:`graphopt.distributed.gathers.place_gathers` then moves each gather to right before
   its first use and gathers again before its first use in the backward pass.
3. After the backward pass, each bucket of gradients (reverse order of first use) is prepared (unscaled,
   accumulated) and reduced with one collective, tagged so that :mod:`graphopt.train.schedule` issues it as
   soon as the bucket's last gradient exists: an all-reduce of the mean (``none``), a reduce-scatter of the
   mean to each rank's rows (``grad_op``, ``full``).
4. The guard of ``on_nonfinite`` ("raise", "skip") takes every rank's verdict: ``ok = ∧_r ok_r`` (an
   all-reduce of the count of non-finite ranks), so all ranks skip alike. Clipping uses the norm of the
   whole averaged gradient: ``‖ḡ‖² = Σ_r Σ_i ‖rows_r(ḡ_i)‖²`` (an all-reduce of the sharded part).
5. The optimizer updates this rank's rows of each parameter and of its row slots
   (``Optimizer.update_shard``); with ``grad_op`` each bucket of updated rows is then all-gathered into the
   full parameters (one collective per bucket); with ``full`` the shards are the parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch.distributed import _functional_collectives as funcol
from torch.fx.traceback import annotate

from graphopt.distributed.buckets import all_gather, assign_buckets, mean_all_reduce, mean_reduce_scatter
from graphopt.distributed.layout import Shard
from graphopt.rewrite.meta import gather_annotation, update_annotation

if TYPE_CHECKING:
    from graphopt.distributed.replicas import Replicas

REDUCE = "<reduce bucket {}>"
WRITE_BACK = "<gather bucket {}>"


class StepSync:
    """The collectives of one step graph of the data-parallel model ``replicas`` (see the module docstring)."""

    def __init__(self, replicas: Replicas) -> None:
        self.replicas = replicas
        self.group, self.world = replicas.group, replicas.world

    def _buckets(self, names: Sequence[str], tensors: Mapping[str, torch.Tensor]) -> list:
        return assign_buckets(names, tensors, self.replicas.shards, self.replicas.bucket_mb)

    def _gradient_order(self, names: Sequence[str]) -> list[str]:
        """``names`` in the order the backward pass produces their gradients (reverse first use)."""
        used = [n for n in reversed(self.replicas.forward_order) if n in names]
        return used + [n for n in names if n not in used]

    # -- before the forward ---------------------------------------------------------------------------
    def sync_buffers(self, buffers: Mapping[str, torch.Tensor]) -> None:
        """Overwrite every buffer with the group's first rank's (``sync_buffers=True``), in place."""
        if not self.replicas.sync_buffers:
            return
        kinds: dict[tuple[torch.dtype, torch.device], list[str]] = {}
        for name, buffer in buffers.items():
            kinds.setdefault((buffer.dtype, buffer.device), []).append(name)
        for names in kinds.values():
            tensors = [buffers[n] for n in names]
            flat = torch.cat([t.reshape(-1) for t in tensors])
            synced = funcol.broadcast(flat, 0, self.group)
            for tensor, piece in zip(tensors, synced.split([t.numel() for t in tensors])):
                tensor.copy_(piece.view(tensor.shape))

    def full_parameters(self, params: Mapping[str, torch.Tensor], frozen: Mapping[str, torch.Tensor]
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The full parameters the forward uses: with ``full``, gathered from the shards bucket by bucket (the
        trainable ones as new leaves that require grad); otherwise ``params`` and ``frozen`` themselves."""
        if self.replicas.sharding != "full":
            return dict(params), dict(frozen)
        tensors = {**params, **frozen}
        shards = self.replicas.shards
        names = [n for n in self.replicas.forward_order if n in tensors and shards[n].sharded]
        whole = dict(tensors)
        with torch.no_grad():
            for index, bucket in enumerate(self._buckets(names, tensors)):
                with annotate(gather_annotation(index)):
                    gathered = all_gather([tensors[n] for n in bucket.names], [shards[n] for n in bucket.names],
                                          self.group, self.world)
                whole.update(zip(bucket.names, gathered))
        full = {n: whole[n].detach().requires_grad_() if whole[n] is not params[n] else params[n] for n in params}
        return full, {n: whole[n] for n in frozen}

    # -- after the backward ---------------------------------------------------------------------------
    def reduce(self, full: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor | None],
               prepare: Callable[[str, torch.Tensor | None], torch.Tensor]) -> list[torch.Tensor]:
        """Each gradient prepared (``prepare(name, grad)``) and averaged over the ranks, bucket by bucket: the
        full mean (``none``, and parameters that are not sharded) or this rank's rows of it; in ``grads``'
        order."""
        shards = self.replicas.shards
        reduced: dict[str, torch.Tensor] = {}
        for index, bucket in enumerate(self._buckets(self._gradient_order(list(grads)), full)):
            with annotate(update_annotation(REDUCE.format(index))):
                prepared = [prepare(n, grads[n]) for n in bucket.names]
                if bucket.sharded:
                    out = mean_reduce_scatter(prepared, [shards[n] for n in bucket.names], self.group, self.world)
                else:
                    out = mean_all_reduce(prepared, self.group, self.world)
            reduced.update(zip(bucket.names, out))
        return [reduced[n] for n in grads]

    def all_true(self, ok: torch.Tensor) -> torch.Tensor:
        """``ok`` of every rank: true when no rank's is false (one all-reduce)."""
        failed = funcol.all_reduce((~ok).to(torch.float32), "sum", self.group)
        return failed == 0

    def grad_norm(self, names: Sequence[str], grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """``‖ḡ‖``, the 2-norm of the whole averaged gradient (each rank holds its rows of the sharded ones)."""
        shards = self.replicas.shards
        parts = {True: [], False: []}
        for name, grad in zip(names, grads):
            parts[shards[name].sharded].append(torch.linalg.vector_norm(grad))
        squares = [torch.stack(v).square().sum() for v in parts.values() if v]
        if parts[True]:
            squares[0] = funcol.all_reduce(squares[0], "sum", self.group)
        return torch.stack(squares).sum().sqrt()

    def shard(self, name: str) -> Shard | None:
        """The layout the update of ``name`` sees (None: the update sees the whole parameter)."""
        shard = self.replicas.shards[name]
        if not shard.sharded:
            return None
        return replace(shard, row_slots=self.replicas.row_slots.get(name, frozenset()))

    def local_parameter(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """What the update of ``name`` changes: with ``grad_op`` a copy of this rank's rows, else ``param``."""
        shard = self.replicas.shards[name]
        return shard.local(param) if self.replicas.sharding == "grad_op" and shard.sharded else param

    def write_back(self, params: Mapping[str, torch.Tensor], updated: Mapping[str, torch.Tensor]) -> None:
        """``grad_op``: every rank's updated rows all-gathered into the full parameters, bucket by bucket."""
        if self.replicas.sharding != "grad_op":
            return
        shards = self.replicas.shards
        names = [n for n in self._gradient_order(list(updated)) if shards[n].sharded]
        for index, bucket in enumerate(self._buckets(names, params)):
            with annotate(update_annotation(WRITE_BACK.format(index))):
                gathered = all_gather([updated[n] for n in bucket.names], [shards[n] for n in bucket.names],
                                      self.group, self.world)
                for name, value in zip(bucket.names, gathered):
                    params[name].copy_(value)
