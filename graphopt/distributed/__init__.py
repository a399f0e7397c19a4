"""Data-parallel training of a compiled model with ``torch.distributed`` (gloo on CPU, NCCL on GPU).

``graphopt.compile(model, ..., process_group=group, sharding="none" | "grad_op" | "full", bucket_mb=25,
sync_buffers=False)``: every rank trains on its own batches and the step uses the gradient averaged over the
``R`` ranks, ``ḡ = (1/R) Σ_r g_r``, with the collectives traced into the one training graph as functional
collectives (``torch.distributed._functional_collectives``). With equal per-rank batches and a mean-reduced
loss, R ranks on batches ``x_1 … x_R`` take the step one process takes on their concatenation (DDP's
contract), whatever the sharding (FSDP's ``ShardingStrategy`` names):

- ``"none"`` (DDP): parameters, gradients and optimizer state whole on every rank; gradients all-reduced in
  buckets of ``bucket_mb`` MiB, each as soon as its last gradient exists;
- ``"grad_op"`` (ZeRO-2, ``SHARD_GRAD_OP``): gradients reduce-scattered in buckets, each rank updates its
  rows of every parameter and of its optimizer state, the updated rows are all-gathered into the parameters;
- ``"full"`` (ZeRO-3, ``FULL_SHARD``): the parameters are also sharded at rest, gathered bucket by bucket
  right before their use in the forward and again in the backward pass, and freed after.

The modules: :mod:`~graphopt.distributed.layout` (a parameter's rows on each rank, the ``Shard`` an
optimizer's sharded update sees), :mod:`~graphopt.distributed.buckets` (bucket assignment and the
bucketed collectives), :mod:`~graphopt.distributed.step_sync` (the collectives of one traced step),
:mod:`~graphopt.distributed.gathers` (where the gathers of ``full`` go in the step graph) and
:mod:`~graphopt.distributed.replicas` (the per-model plan: set-up, optimizer state, checkpoints).
See ``docs/distributed.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from graphopt.distributed.layout import Shard
from graphopt.distributed.replicas import SHARDINGS, Replicas, broadcast_module

if TYPE_CHECKING:
    from graphopt.captured import CapturedModel

__all__ = ["SHARDINGS", "Replicas", "Shard", "broadcast_module", "check_process_group", "data_parallel"]


def check_process_group(group: object) -> dist.ProcessGroup:
    """``group`` as a ProcessGroup of an initialised default group; a clear error otherwise."""
    from graphopt.errors import OptionError

    if not dist.is_available() or not dist.is_initialized():
        raise OptionError("process_group=... needs torch.distributed initialised first: "
                          "torch.distributed.init_process_group('gloo' or 'nccl', ...)")
    if not isinstance(group, dist.ProcessGroup):
        raise OptionError(f"process_group must be a torch.distributed.ProcessGroup (e.g. "
                          f"torch.distributed.group.WORLD), got {type(group).__name__}")
    return group


def data_parallel(captured: CapturedModel, options: Any) -> Replicas | None:
    """The data-parallel plan of ``captured`` for the training options (None without ``process_group``), set
    up: same start on every rank, and with ``sharding="full"`` the parameters cut to this rank's rows."""
    if options.process_group is None:
        return None
    replicas = Replicas(options.process_group, options.sharding, options.bucket_mb, options.sync_buffers)
    optimizer = captured.contributions.optimizer
    replicas.setup(captured.gm, optimizer[1] if optimizer is not None else None)
    return replicas
