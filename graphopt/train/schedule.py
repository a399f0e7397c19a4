"""Schedule each parameter's update right after its gradient exists in the traced training graph.

``build_step_function`` traces the updates after the whole backward pass, each parameter's update nodes
tagged with its name (``graphopt.rewrite.meta.update_tag``, set through ``torch.fx.traceback.annotate``). Left there,
every gradient stays alive until the end of the backward pass. :func:`schedule_updates` moves each
tagged group of nodes to the earliest point where

1. every value it reads exists (data dependencies);
2. for every tensor it mutates in place (the parameter, its optimizer state), every other node that
   reads or writes that storage — directly or through a view (``t``, ``view``, ``expand``, … : any aten
   op whose schema says its result aliases an input) — has run, so the forward and backward still see
   the old parameter;
3. for every storage it reads that another node mutates earlier, that mutation has run.

Nodes that are not updates keep their relative order. FX code generation frees each value after its
last use, so in the eager graph each gradient dies right after its update; ``torch.compile`` receives
the reordered graph.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from typing import Any

import torch

from graphopt.rewrite.meta import update_tag


def _schema_args(node: torch.fx.Node) -> list[tuple[Any, Any]]:
    """(schema argument, actual value) pairs of an aten op call."""
    schema = node.target._schema
    pairs = []
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            pairs.append((arg, node.args[i]))
        elif arg.name in node.kwargs:
            pairs.append((arg, node.kwargs[arg.name]))
    return pairs


def _nodes_in(value: Any) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg(value, found.append)
    return found


def alias_sources(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The input nodes whose storage ``node``'s result shares (views and in-place ops return their input)."""
    if node.op != "call_function":
        return []
    if node.target is operator.getitem:
        source = node.args[0]
        return [source] if isinstance(source, torch.fx.Node) and alias_sources(source) else []
    if not isinstance(node.target, torch._ops.OpOverload):
        return []
    returned = {s for r in node.target._schema.returns if r.alias_info is not None for s in r.alias_info.before_set}
    if not returned:
        return []
    sources = []
    for arg, value in _schema_args(node):
        if arg.alias_info is not None and set(arg.alias_info.before_set) & returned:
            sources.extend(_nodes_in(value))
    return sources


def mutated_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The input nodes ``node`` writes to in place (schema arguments marked ``Tensor(a!)``)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return []
    written = []
    for arg, value in _schema_args(node):
        if arg.alias_info is not None and arg.alias_info.is_write:
            written.extend(_nodes_in(value))
    return written


def storage_bases(graph: torch.fx.Graph) -> dict[torch.fx.Node, frozenset[torch.fx.Node]]:
    """For each node, the nodes owning the storage its result may alias (itself when it owns new storage)."""
    bases: dict[torch.fx.Node, frozenset[torch.fx.Node]] = {}
    for node in graph.nodes:
        sources = alias_sources(node)
        bases[node] = frozenset().union(*(bases[s] for s in sources)) if sources else frozenset({node})
    return bases


def schedule_updates(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Move each tagged update group right after the last node it must follow; returns ``gm`` (changed in place).

    A group whose earliest legal place would come after a later node that must follow it stays where it was.
    """
    graph = gm.graph
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    groups: dict[str, list[torch.fx.Node]] = defaultdict(list)
    for node in nodes:
        tag = update_tag(node)
        if tag is not None and node.op == "call_function":
            groups[tag].append(node)
    if not groups:
        return gm
    bases = storage_bases(graph)
    readers: dict[torch.fx.Node, list[torch.fx.Node]] = defaultdict(list)  # storage → nodes using it
    writers: dict[torch.fx.Node, list[torch.fx.Node]] = defaultdict(list)  # storage → nodes writing it
    for node in nodes:
        for used in node.all_input_nodes:
            for base in bases[used]:
                readers[base].append(node)
        for written in mutated_inputs(node):
            for base in bases[written]:
                writers[base].append(node)

    grouped = {n for members in groups.values() for n in members}
    order = [n for n in nodes if n not in grouped]
    for members in sorted(groups.values(), key=lambda group: position[group[0]]):
        inside = set(members)
        first, last = position[members[0]], position[members[-1]]
        must_follow: set[torch.fx.Node] = set()   # nodes that must run before the group
        must_precede: set[torch.fx.Node] = set()  # nodes that must run after the group
        for node in members:
            must_follow.update(n for n in node.all_input_nodes if n not in inside)
            for user in node.users:
                if user not in inside:
                    must_precede.add(user)
            touched = {b for used in node.all_input_nodes for b in bases[used]}
            for written in mutated_inputs(node):
                for base in bases[written]:
                    for other in readers[base] + writers[base]:
                        if other in inside:
                            continue
                        (must_follow if position[other] < first else must_precede).add(other)
            for base in touched:
                for other in writers[base]:
                    if other not in inside:
                        (must_follow if position[other] < first else must_precede).add(other)
        index = {n: i for i, n in enumerate(order)}
        if any(n not in index for n in must_follow):  # depends on a group placed later: keep it in place
            anchor = None
        else:
            anchor = max((index[n] for n in must_follow), default=-1)
            later = [index[n] for n in must_precede if n in index]
            if later and anchor >= min(later):
                anchor = None
        if anchor is None:  # original place: before the first remaining node that came after the group
            anchor = next((i - 1 for i, n in enumerate(order) if position.get(n, -1) > last), len(order) - 1)
        order[anchor + 1:anchor + 1] = members

    previous = None
    for node in order:
        if previous is not None and previous.next is not node:
            previous.append(node)
        previous = node
    graph.lint()
    gm.recompile()
    return gm
