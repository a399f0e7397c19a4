"""What methods contribute, recorded through their contexts: one list per pipeline phase that reads it.

Each entry keeps the :class:`~graphopt.context.MethodContext` that recorded it, so the phase that runs it
calls it through :func:`graphopt.dispatch.dispatch` (errors name the method). The contract itself, when each
kind runs, on which graph and what it may change, is documented on ``MethodContext``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

if TYPE_CHECKING:
    from graphopt.context import MethodContext
    from graphopt.optim import Optimizer

Hyper = Mapping[str, torch.Tensor]
LossTerm = Callable[[Mapping[str, torch.Tensor], Hyper], "torch.Tensor | None"]
PostUpdate = Callable[[torch.Tensor, Hyper], None]
Schedule = Callable[[int], float]
ChooseVariant = Callable[[int], "Hashable | None"]
BuildVariant = Callable[[torch.fx.GraphModule, Hashable], "tuple[torch.fx.GraphModule, set[str]]"]
GraphPass = Callable[[torch.fx.GraphModule], None]


class Entry(NamedTuple):
    """One contribution: the context that recorded it and its callable."""

    ctx: MethodContext
    fn: Callable[..., Any]


class PostUpdateEntry(NamedTuple):
    ctx: MethodContext
    params: frozenset[str]
    fn: PostUpdate


class VariantEntry(NamedTuple):
    ctx: MethodContext
    choose: ChooseVariant
    build: BuildVariant


class StateEntry(NamedTuple):
    ctx: MethodContext
    save: Callable[[], dict[str, Any]]
    load: Callable[[Mapping[str, Any]], None]
    shapes: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None


@dataclass
class Contributions:
    """Everything the methods of one compiled model recorded, by the phase that reads it."""

    # forward graph (read by the pass manager when it freezes base weights)
    parameters: dict[str, MethodContext] = field(default_factory=dict)
    # training step
    optimizer: tuple[MethodContext, Optimizer] | None = None
    loss_terms: list[Entry] = field(default_factory=list)
    post_updates: list[PostUpdateEntry] = field(default_factory=list)
    hyperparameters: dict[str, Entry] = field(default_factory=dict)
    step_variants: list[VariantEntry] = field(default_factory=list)
    training_passes: list[Entry] = field(default_factory=list)
    # inference and export
    inference_passes: list[Entry] = field(default_factory=list)
    export_passes: dict[bool, list[Entry]] = field(default_factory=lambda: {True: [], False: []})
    onnx_translations: dict[Any, Entry] = field(default_factory=dict)
    # state, show, model functions
    states: list[StateEntry] = field(default_factory=list)
    descriptions: list[tuple[MethodContext, str]] = field(default_factory=list)
    functions: dict[str, Entry] = field(default_factory=dict)
