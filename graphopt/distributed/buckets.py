"""Buckets: tensors flattened into one buffer so that one collective moves all of them (DDP's gradient buckets).

:func:`assign_buckets` groups names in a given order (gradients: the reverse of the forward's first use, the
order the backward pass produces them, as DDP assumes; parameters to gather: the forward's first use) into
consecutive buckets of at most ``bucket_mb`` MiB of full-size tensors (a larger tensor gets a bucket of its
own; ``bucket_mb=0`` puts each in its own), never mixing dtypes, devices or sharded with whole tensors.

The traced collectives of one bucket (``R`` ranks, functional collectives, so each is one node of the step
graph):

- :func:`mean_all_reduce`: ``ḡ_i = (1/R) Σ_r g_{i,r}`` for every tensor of the bucket (one all-reduce);
- :func:`mean_reduce_scatter`: this rank's rows of each ``ḡ_i`` (one reduce-scatter: the buffer is laid out
  rank-major, rank ``r``'s rows of every tensor side by side, so rank ``r`` receives exactly its rows);
- :func:`all_gather`: every full tensor from the ranks' rows (one all-gather, the same rank-major layout).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.distributed import _functional_collectives as funcol

from graphopt.distributed.layout import Shard

MIB = 2**20


@dataclass(frozen=True)
class Bucket:
    """The names of the tensors one collective moves, in buffer order."""

    names: tuple[str, ...]
    sharded: bool


def assign_buckets(order: Sequence[str], tensors: Mapping[str, torch.Tensor], shards: Mapping[str, Shard],
                   bucket_mb: float) -> list[Bucket]:
    """Consecutive names of ``order`` grouped into buckets of at most ``bucket_mb`` MiB (see the module
    docstring); the size of a name is that of its full tensor (``shards[name].shape``, ``tensors[name].dtype``)."""
    cap = bucket_mb * MIB
    buckets: list[Bucket] = []
    names: list[str] = []
    size, kind = 0, None
    for name in order:
        tensor, shard = tensors[name], shards[name]
        nbytes = max(1, torch.Size(shard.shape).numel()) * tensor.element_size()
        this_kind = (tensor.dtype, tensor.device, shard.sharded)
        if names and (this_kind != kind or size + nbytes > cap):
            buckets.append(Bucket(tuple(names), bool(kind[2])))
            names, size = [], 0
        names.append(name)
        size, kind = size + nbytes, this_kind
    if names:
        buckets.append(Bucket(tuple(names), bool(kind[2])))
    return buckets


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    pieces = [t.reshape(-1) for t in tensors]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def mean_all_reduce(tensors: Sequence[torch.Tensor], group: object, world: int) -> list[torch.Tensor]:
    """``(1/R) Σ_r t_r`` of each tensor with one all-reduce (sum, then divide: gloo has no AVG)."""
    total = funcol.all_reduce(_flat(tensors), "sum", group) / world
    pieces = total.split([t.numel() for t in tensors])
    return [piece.view(t.shape) for piece, t in zip(pieces, tensors)]


def mean_reduce_scatter(tensors: Sequence[torch.Tensor], shards: Sequence[Shard], group: object,
                        world: int) -> list[torch.Tensor]:
    """This rank's rows of ``(1/R) Σ_r t_r`` for each full-size tensor, with one reduce-scatter."""
    blocks = [shard.padded(t).reshape(world, -1) for t, shard in zip(tensors, shards)]
    buffer = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
    local = funcol.reduce_scatter_tensor(buffer.reshape(-1), "sum", 0, group) / world
    pieces = local.split([shard.block_numel for shard in shards])
    return [piece.view(shard.shard_shape) for piece, shard in zip(pieces, shards)]


def all_gather(blocks: Sequence[torch.Tensor], shards: Sequence[Shard], group: object,
               world: int) -> list[torch.Tensor]:
    """Each full tensor from every rank's block (``blocks``: this rank's), with one all-gather."""
    gathered = funcol.all_gather_single(_flat(blocks), 0, group).view(world, -1)
    pieces = gathered.split([shard.block_numel for shard in shards], dim=1)
    return [shard.assemble(piece) for piece, shard in zip(pieces, shards)]
