"""How one parameter lies across the R ranks of a sharded model: row blocks of dim 0 (FSDP2's ``Shard(0)``).

A tensor of shape ``(n, *rest)`` is cut into R blocks of ``k = ⌈n/R⌉`` rows: rank ``r`` holds rows
``[r·k, (r+1)·k)``, zero-padded to ``k`` rows (when R does not divide n the last ranks hold padding rows,
which stay zero: their gradient is zero, and every built-in rule maps a zero parameter row with zero state
and zero gradient to zero). A 0-d tensor is not sharded; every rank holds all of it.

:class:`Shard` is what a sharded optimizer update receives (``graphopt.optim.Optimizer.update_shard``): the
parameter's full shape, this rank, and the traced collectives an update may need — :meth:`Shard.gather`
(the full tensor from every rank's rows), :meth:`Shard.local` (this rank's rows of a full tensor) and
:meth:`Shard.all_reduce` (the sum over ranks). They are functional collectives
(``torch.distributed._functional_collectives``), so inside the training step they are nodes of its graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed import _functional_collectives as funcol


@dataclass(frozen=True, eq=False)
class Shard:
    """One parameter's layout: ``shape`` (the full tensor's), ``rank`` of ``world`` in ``group``; ``sharded``
    is False for a tensor every rank holds whole (0-d parameters, ``sharding="none"``); ``row_slots`` names
    the optimizer slots split with it (``Optimizer.row_slots``), the others every rank holds whole."""

    shape: tuple[int, ...]
    rank: int
    world: int
    group: Any
    sharded: bool = True
    row_slots: frozenset[str] = frozenset()  # the optimizer slots laid out like the parameter, sharded with it

    @property
    def rows(self) -> int:
        """The full tensor's dim 0."""
        return self.shape[0]

    @property
    def rows_per_rank(self) -> int:
        """``k = ⌈n/R⌉``: the rows each rank holds (padding included)."""
        return math.ceil(self.rows / self.world)

    @property
    def shard_shape(self) -> tuple[int, ...]:
        """The shape of this rank's block, ``(k, *rest)`` (the full shape when not sharded)."""
        return (self.rows_per_rank, *self.shape[1:]) if self.sharded else self.shape

    @property
    def block_numel(self) -> int:
        """Elements of one rank's block."""
        return math.prod(self.shard_shape)

    def padded(self, full: torch.Tensor) -> torch.Tensor:
        """``full`` with zero rows appended to ``R·k`` rows (itself when R divides n)."""
        missing = self.world * self.rows_per_rank - self.rows
        if missing == 0:
            return full
        return torch.cat([full, full.new_zeros((missing, *self.shape[1:]))])

    def local(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of ``full`` (a new tensor, zero-padded to ``k`` rows)."""
        if not self.sharded:
            return full.clone()
        k = self.rows_per_rank
        return self.padded(full)[self.rank * k:(self.rank + 1) * k].clone()

    def assemble(self, blocks: torch.Tensor) -> torch.Tensor:
        """The full tensor from ``blocks`` of shape ``(R, k·rest)`` (rank r's block in row r), padding dropped."""
        return blocks.reshape(self.world * self.rows_per_rank, *self.shape[1:])[:self.rows]

    def gather(self, block: torch.Tensor) -> torch.Tensor:
        """The full tensor from every rank's ``block`` (an all-gather; traced as one collective)."""
        if not self.sharded:
            return block
        blocks = funcol.all_gather_single(block.reshape(-1), 0, self.group)
        return self.assemble(blocks.view(self.world, -1))

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """``Σ_r tensor_r`` over the ranks (an all-reduce)."""
        return funcol.all_reduce(tensor, "sum", self.group)
