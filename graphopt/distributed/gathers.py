"""Where the parameter all-gathers of ``sharding="full"`` run in the traced training step: FSDP's gather
before use, reshard after forward, gather again for the backward pass.

The step traces every bucket's all-gather before the forward (``StepSync.full_parameters``), its nodes
tagged ``graphopt_gather``. :func:`place_gathers` then, per bucket:

1. drops the gather when nothing uses it (a variant graph that skips the bucket's blocks);
2. moves it, with the views taken of it, to right before the first forward node that uses one of its
   parameters (other than through a view);
3. when the backward pass reads them — directly or through views the forward took (``t``, ``detach``,
   ``expand``, … : ops whose schema says the result aliases the input, and dtype casts) — copies the gather
   and those views to right before the first such backward node and points the backward nodes at the copy.

FX frees each value after its last use, so a bucket's full parameters live from its first forward use to its
last, and again in the backward pass from its first use there to its last: between, only shards are held
(saved activations the backward needs are kept as usual).
"""

from __future__ import annotations

import torch

from graphopt.rewrite.meta import gather_tag
from graphopt.train.checkpointing import PHASE
from graphopt.train.schedule import alias_sources, mutated_inputs

CASTS = {torch.ops.aten._to_copy.default}


def _backward(node: torch.fx.Node) -> bool:
    return (node.meta.get("custom") or {}).get(PHASE) == "backward"


def _is_view(node: torch.fx.Node, of: set[torch.fx.Node]) -> bool:
    """``node`` is a forward view (or a dtype cast) of a node in ``of``, writing nothing."""
    if node.op != "call_function" or _backward(node) or mutated_inputs(node):
        return False
    if node.target in CASTS:
        return node.args[0] in of
    return any(source in of for source in alias_sources(node))


def place_gathers(gm: torch.fx.GraphModule) -> int:
    """Place each bucket's gather (see the module docstring), in place; returns how many buckets are gathered
    again for the backward pass."""
    graph = gm.graph
    groups: dict[int, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        tag = gather_tag(node)
        if tag is not None and node.op == "call_function":
            groups.setdefault(tag, []).append(node)
    again = 0
    for members in groups.values():
        inside = set(members)
        if not any(u not in inside for m in members for u in m.users):
            for node in reversed(members):
                graph.erase_node(node)
            continue
        closure, views = set(members), []
        for node in graph.nodes:
            if node not in inside and _is_view(node, closure):
                closure.add(node)
                views.append(node)
        position = {n: i for i, n in enumerate(graph.nodes)}
        forward_users = [u for n in closure for u in n.users if u not in closure and not _backward(u)]
        if forward_users:  # the gather and the views taken of it before their first use, moved right before it
            first = min(forward_users, key=position.__getitem__)
            for node in [n for n in graph.nodes if n in closure and position[n] < position[first]]:
                first.prepend(node)
        backward_users = {u for n in closure for u in n.users if _backward(u)}
        if backward_users:
            again += 1
            _gather_again(graph, [n for n in graph.nodes if n in closure], backward_users)
            if not any(u not in inside for m in members for u in m.users):  # only the backward reads it
                for node in reversed(members):
                    graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return again


def _gather_again(graph: torch.fx.Graph, chain: list[torch.fx.Node], users: set[torch.fx.Node]) -> None:
    """Copy what ``users`` read of ``chain`` (the gather and its views, in graph order) to right before the first
    of them, and point them at the copies; views nothing reads any more are dropped."""
    members = set(chain)
    needed: set[torch.fx.Node] = set()
    stack = [a for u in users for a in u.all_input_nodes if a in members]
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(a for a in node.all_input_nodes if a in members)
    position = {n: i for i, n in enumerate(graph.nodes)}
    first = min(users, key=position.__getitem__)
    copies: dict[torch.fx.Node, torch.fx.Node] = {}
    with graph.inserting_before(first):
        for node in chain:
            if node in needed:
                copies[node] = graph.node_copy(node, lambda a: copies.get(a, a))
                copies[node].meta["custom"] = {**(node.meta.get("custom") or {}), PHASE: "backward"}
    for user in users:
        for source in user.all_input_nodes:
            if source in copies:
                user.replace_input_with(source, copies[source])
    for node in reversed(chain):
        if not node.users and gather_tag(node) is None:
            graph.erase_node(node)
