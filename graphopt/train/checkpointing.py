"""Activation checkpointing of residual blocks, as a pass over the traced training graph.

``graphopt.compile(..., checkpoint_blocks=True)`` (every residual block, :mod:`graphopt.rewrite.blocks`) or
``checkpoint_blocks=[globs]``: for each block, the forward values its backward reads are computed again
right before the block's backward, from the block's inputs, instead of being kept alive from the forward
pass. The recomputation is a copy of the same ops, so the numbers are the same. What cannot be computed
again is kept: random draws (dropout masks) and ops that write in place into a value that is not itself
recomputed (a mask scaled in place, batch-norm running statistics). In the eager graph each value is
freed after its last use, so between its forward and its backward a block holds only its inputs and
masks; a compiler may plan memory on its own.

The forward is traced node by node (``run_node_by_node``) so that its nodes keep the module path they ran
in (``nn_module_stack``); the backward's nodes are tagged ``graphopt_phase = "backward"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.fx._pytree import tree_flatten_spec

from graphopt.progress import logger
from graphopt.train.schedule import alias_sources, mutated_inputs

aten = torch.ops.aten
PHASE = "graphopt_phase"
BACKWARD = {PHASE: "backward"}
_RANDOM = {aten.bernoulli_.float, aten.bernoulli_.Tensor, aten.bernoulli.default, aten.bernoulli.p,
           aten.native_dropout.default, aten.rand_like.default, aten.randn_like.default, aten.rand.default,
           aten.randn.default, aten.uniform_.default, aten.normal_.default, aten.randint_like.default,
           aten.exponential_.default, aten.randperm.default}


class NodeByNode(torch.nn.Module):
    """``gm`` run by ``torch.fx.Interpreter``, so a trace of it keeps each node's module path."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        codegen = self.gm.graph._codegen
        info = getattr(codegen, "pytree_info", None)
        if info is not None and info.in_spec is not None:
            flat = tree_flatten_spec((args, kwargs), info.in_spec)
        else:
            names = [n.target for n in self.gm.graph.nodes if n.op == "placeholder"]
            flat = [*args, *(kwargs[name] for name in names[len(args):])]
        return codegen.process_outputs(torch.fx.Interpreter(self.gm).run(*flat))


def _module_paths(node: torch.fx.Node) -> list[str]:
    return [v[0] for v in (node.meta.get("nn_module_stack") or {}).values() if isinstance(v, tuple) and v]


def checkpoint_blocks(graph: torch.fx.GraphModule, paths: Sequence[str]) -> int:
    """Recompute each block's saved forward values before its backward (see the module docstring), in place;
    returns how many values are recomputed instead of kept."""
    nodes = list(graph.graph.nodes)
    first_backward = next((i for i, n in enumerate(nodes) if (n.meta.get("custom") or {}).get(PHASE) == "backward"),
                          len(nodes))
    later = set(nodes[first_backward:])
    recomputed = 0
    for path in paths:
        members = [n for n in nodes[:first_backward] if n.op == "call_function" and any(
            p == path or p.startswith(path + ".") for p in _module_paths(n))]
        recomputed += _recompute(graph, members, later)
    if recomputed:
        graph.graph.lint()
        graph.recompile()
    return recomputed


def _recompute(graph: torch.fx.GraphModule, members: list[torch.fx.Node], later: set[torch.fx.Node]) -> int:
    inside = set(members)
    kept: set[torch.fx.Node] = set()
    for node in members:  # what cannot be computed again: random draws, writes into what is not recomputed
        sources = alias_sources(node)
        if node.target in _RANDOM or any(s in kept for s in sources) or any(
                m not in inside or m in kept for m in mutated_inputs(node)):
            kept.add(node)
    saved = [n for n in members if n not in kept and any(u in later for u in n.users)]
    if not saved:
        return 0
    needed: set[torch.fx.Node] = set()
    stack = list(saved)
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        stack.extend(a for a in node.all_input_nodes if a in inside and a not in kept)
    position = {n: i for i, n in enumerate(graph.graph.nodes)}
    first_use = min((u for n in saved for u in n.users if u in later), key=position.__getitem__)
    copies: dict[torch.fx.Node, torch.fx.Node] = {}
    with graph.graph.inserting_before(first_use):
        for node in members:
            if node in needed:
                copies[node] = graph.graph.node_copy(node, lambda a: copies.get(a, a))
                copies[node].meta["custom"] = dict(BACKWARD)
    for node in saved:
        node.replace_all_uses_with(copies[node], delete_user_cb=lambda user: user in later)
    logger.debug("checkpointing: %d values recomputed, %d kept (random or written in place)", len(saved), len(kept))
    return len(saved)
