"""Residual blocks of a forward graph: discovery (``find_blocks``) and lookup in copies (``resolve_blocks``).

A *block* is a module whose forward is ``x ↦ x + f(x, extras)``: one residual-stream input ``x``, one output
of ``x``'s shape, starting with a residual add on ``x``; more residual adds, norms or an activation may follow
(pre-norm ``GPT2Block``: ``g = x + attn(ln1(x)); g + mlp(ln2(g))``; post-norm ``BertLayer``:
``a = LN(x + attn(x)); LN(a + ffn(a))``; ResNet basic blocks: ``relu(x + f(x))``). ``extras`` are other
tensor inputs the stream does not flow through (an attention mask or position tensor built once outside
the layers). Modules are read from ``node.meta["nn_module_stack"]``. Graph edits on blocks are in
:mod:`graphopt.rewrite.block_edits`.
"""

from __future__ import annotations

import fnmatch
import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from graphopt.errors import OptionError
from graphopt.rewrite.layers import module_types
from graphopt.rewrite.noops import ASSERTS, is_noop

aten = torch.ops.aten
_ADDS = (aten.add.Tensor, aten.add_.Tensor)


@dataclass(frozen=True)
class Block:
    """A residual block found in a forward graph.

    ``index``: 0-based position in execution order (the schedules' ``l`` is ``index + 1``); ``path``: the
    module path (as in ``model.named_modules()``); ``module_type``: its class; ``input`` / ``output``: names of
    the graph nodes entering and leaving it; ``residual_adds``: ``(add node, branch node)`` names of the
    residual adds on its stream; ``parameters``: names (as ``named_parameters()`` gives them) of the parameters
    it uses; ``extras``: names of its other tensor inputs (masks, position tensors), which the stream skips.
    """

    index: int
    path: str
    module_type: str
    input: str
    output: str
    residual_adds: tuple[tuple[str, str], ...]
    parameters: tuple[str, ...]
    extras: tuple[str, ...] = ()

    def __str__(self) -> str:
        adds = ", ".join(a for a, _ in self.residual_adds)
        extras = f", extra inputs: {', '.join(self.extras)}" if self.extras else ""
        return (f"block {self.index}: {self.path} ({self.module_type}), {self.input} -> {self.output}{extras}, "
                f"residual adds: {adds}, {len(self.parameters)} parameters")


def _module_paths(node: torch.fx.Node) -> list[str]:
    """The module paths of the calls ``node`` runs inside, outermost first. A module's second and later
    calls (``torch.export`` numbers them) are ``<path>@1``, ``<path>@2``, ...: each call of a shared layer
    (ALBERT's one layer group, called once per depth) is its own module, and so its own block; inside such a
    call, the paths continue from it (``group.0@1.layers.0``)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths: list[str] = []
    parent, parent_path, parent_call = "", "", ""
    for key, value in stack.items():
        path = value[0] if isinstance(value, tuple) and value else None
        if not isinstance(path, str) or not path:
            continue
        call = key.rpartition("@")[2] if isinstance(key, str) and "@" in key else ""
        call = call if call.isdigit() and call != parent_call else ""
        base = parent + path[len(parent_path):] if parent_path and path.startswith(parent_path + ".") else path
        full = f"{base}@{call}" if call else base
        if full not in paths:
            paths.append(full)
        parent, parent_path = full, path
        parent_call = call or parent_call
    return paths


def module_path(call_path: str) -> str:
    """The module path (as in ``named_modules()``) of a call path from :func:`module_members`."""
    return re.sub(r"@\d+", "", call_path)


def module_members(gm: torch.fx.GraphModule) -> dict[str, list[torch.fx.Node]]:
    """For each module path, the call nodes that run inside it (in graph order)."""
    found: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module") or node.target == "_guards_fn":
            continue
        for path in _module_paths(node):
            found.setdefault(path, []).append(node)
    return found


def _is_tensor(node: torch.fx.Node) -> bool:
    val = node.meta.get("val", node.meta.get("example_value"))
    return val is None or isinstance(val, torch.Tensor)


def _same_type(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    if not isinstance(va, torch.Tensor) or not isinstance(vb, torch.Tensor):
        return va is None and vb is None
    return str(tuple(va.shape)) == str(tuple(vb.shape)) and va.dtype == vb.dtype


def _reachable(start: torch.fx.Node, region: Any, neighbours: Callable[[torch.fx.Node], Any]) -> set[torch.fx.Node]:
    """``start`` and every node of ``region`` reached from it by following ``neighbours`` (users or inputs)."""
    seen, stack = {start}, [start]
    while stack:
        for node in neighbours(stack.pop()):
            if node in region and node not in seen:
                seen.add(node)
                stack.append(node)
    return seen


def _stream(x_in: torch.fx.Node, x_out: torch.fx.Node, nodes: list[torch.fx.Node],
            region: set[torch.fx.Node]) -> tuple[list[tuple[str, str]], str | None]:
    """The residual adds on the stream ``x_in -> x_out`` of a module's nodes, or why there is no such stream.

    The stream is the chain of nodes every path from ``x_in`` to ``x_out`` passes through (no edge jumps over
    them); a residual add is a stream node ``previous + branch`` whose branch runs off the stream from an
    earlier stream node. Inputs other than ``x_in`` (masks, position tensors) may feed any node.
    """
    descendants = _reachable(x_in, region, lambda n: n.users)
    if x_out not in descendants:
        return [], "its output does not depend on that input"
    ancestors = _reachable(x_out, region, lambda n: n.all_input_nodes)
    on_path = [x_in] + [n for n in nodes if n in descendants and n in ancestors]
    position = {n: i for i, n in enumerate(on_path)}
    jumps = [0] * (len(on_path) + 1)
    for node in on_path[1:]:
        for arg in node.all_input_nodes:
            if arg in position and position[node] - position[arg] > 1:
                jumps[position[arg] + 1] += 1
                jumps[position[node]] -= 1
    stream, open_jumps = [], 0
    for i, node in enumerate(on_path):
        open_jumps += jumps[i]
        if open_jumps == 0:
            stream.append(node)
    stream_set = set(stream)
    adds: list[tuple[str, str]] = []
    for previous, node in itertools.pairwise(stream):
        if node.op != "call_function" or node.target not in _ADDS or node.kwargs.get("alpha", 1) != 1:
            continue
        operands = node.args[:2]
        if previous not in operands:
            continue
        branch = operands[1] if operands[0] is previous else operands[0]
        if isinstance(branch, torch.fx.Node) and branch in position and branch not in stream_set:
            adds.append((node.name, branch.name))
    first = next((n for n in stream[1:] if not is_noop(n)), None)  # casts to the same dtype, shape-keeping views
    if first is None or not adds or adds[0][0] != first.name:
        return [], "it does not start with a residual add x + f(x) on its input"
    return adds, None


def _analyse(gm: torch.fx.GraphModule, path: str, nodes: list[torch.fx.Node], index: int = 0,
             module_type: str = "") -> Block | str:
    """The block that module ``path`` forms, or why it is not one.

    Of the module's tensor inputs, exactly one (the residual stream ``x``, of the output's shape and dtype)
    must start a residual stream to the output; the others (``extras``: attention masks, position tensors
    built once outside the layers) may feed the branches but the stream does not flow through them.
    """
    region = set(nodes)
    inputs: list[torch.fx.Node] = []
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in region and arg.op != "get_attr" and _is_tensor(arg) and arg not in inputs:
                inputs.append(arg)
    if not inputs:
        return "it takes no tensor input"
    outputs = [n for n in nodes if any(user not in region for user in n.users) and n.target not in ASSERTS]
    if not outputs:
        return "none of its values is used outside it"
    pairs = [(x, out) for out in outputs for x in inputs if _same_type(x, out)]
    if not pairs:
        return ("its output's shape or dtype differs from its input's" if len(inputs) == 1 else
                f"none of its {len(inputs)} tensor inputs has an output's shape and dtype")
    streams = {}
    reason = ""
    for candidate, x_out in pairs:
        adds, why = _stream(candidate, x_out, nodes, region)
        if why is None:
            why = _auxiliary(candidate, x_out, outputs, region)
        if why is None:
            streams[candidate] = (x_out, adds)
        else:
            reason = why
    if not streams:
        return reason if len(inputs) == 1 else f"of its {len(inputs)} tensor inputs, none is a residual stream " \
            f"to its output ({reason})"
    if len(streams) > 1:
        return (f"{len(streams)} of its tensor inputs ({', '.join(n.name for n in streams)}) each start a residual "
                "stream to its output (a block has one)")
    ((x_in, (x_out, adds)),) = streams.items()
    extras = tuple(n.name for n in inputs if n is not x_in)
    params = []
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and isinstance(_attr(gm, arg.target), torch.nn.Parameter):
                params.append(arg.target)
        if node.op == "call_module":
            params += [f"{node.target}.{n}" for n, _ in gm.get_submodule(node.target).named_parameters()]
    params = canonical_names(gm, params)
    return Block(index, path, module_type, x_in.name, x_out.name, tuple(adds), tuple(dict.fromkeys(params)), extras)


def _auxiliary(x_in: torch.fx.Node, x_out: torch.fx.Node, outputs: list[torch.fx.Node],
               region: set[torch.fx.Node]) -> str | None:
    """Why the outputs other than ``x_out`` stop ``x_in -> x_out`` from being a block, or None: each must
    not depend on the stream (T5's position bias, computed in the first layer from positions and the mask
    and passed along), so a dropped block keeps computing it."""
    others = [n for n in outputs if n is not x_out]
    if not others:
        return None
    descendants, stack = {x_in}, [x_in]
    while stack:
        for user in stack.pop().users:
            if user in region and user not in descendants:
                descendants.add(user)
                stack.append(user)
    tied = [n.name for n in others if n in descendants]
    if tied:
        return (f"{len(outputs)} of its values are used outside it and {', '.join(tied)} depends on its input "
                "(a block returns one stream value; other outputs may not depend on the stream)")
    return None


def canonical_names(gm: torch.nn.Module, names: Sequence[str]) -> list[str]:
    """``names`` with each parameter under the name ``gm.named_parameters()`` gives it: a tied parameter
    (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) may be read in the graph under either name."""
    canonical = {id(p): n for n, p in gm.named_parameters()}
    return [canonical.get(id(_attr(gm, n)), n) for n in names]


def _attr(gm: torch.nn.Module, qualified: str) -> Any:
    owner, _, name = qualified.rpartition(".")
    try:
        return getattr(gm.get_submodule(owner) if owner else gm, name)
    except AttributeError:
        return None


def _outermost(paths: Sequence[str]) -> list[str]:
    return [p for p in paths if not any(p.startswith(q + ".") for q in paths if q != p)]


def _is_container(path: str, candidates: Mapping[str, Block], members: Mapping[str, list[torch.fx.Node]]) -> bool:
    """Whether candidate ``path`` is only a chain of blocks: two or more outermost candidates inside it, all of
    one module type, cover all of its nodes (an ``nn.Sequential`` of blocks, an encoder of layers). A
    transformer layer whose residual adds sit in candidate sub-modules (BERT's ``BertSelfOutput`` /
    ``BertOutput``) still has nodes of its own outside them (the attention itself, the intermediate MLP), and
    one made only of sub-layers of different kinds (T5's self-attention and feed-forward sub-layers) is a
    layer too: both are blocks, not containers."""
    inner = _outermost([q for q in candidates if q.startswith(path + ".")])
    if len(inner) < 2 or len({candidates[q].module_type for q in inner}) > 1:
        return False
    covered = {node for q in inner for node in members[q]}
    return all(node in covered for node in members[path])


def find_blocks(gm: torch.fx.GraphModule, blocks: str | Sequence[str] | None = None,
                method: str = "layerdrop") -> list[Block]:
    """The residual blocks of the forward graph ``gm``, in execution order.

    A block is a module (read from ``node.meta["nn_module_stack"]``) whose nodes hand one tensor back to the
    rest of the graph and take, among their tensor inputs, exactly one ``x`` of the output's shape and dtype
    from which a residual stream reaches the output, the stream's first op being a residual add
    ``x + f(x, extras)`` (``aten.add.Tensor`` or ``aten.add_.Tensor``; batch-norm counters are never that);
    the other inputs (``extras``) only feed branches. With ``blocks=None`` every such module is a candidate;
    a candidate whose nodes are all covered by two or more candidates inside it is a container (an
    ``nn.Sequential`` of blocks, an encoder of layers), not a block; otherwise it is a block and the
    candidates inside it are ignored (a BERT layer, whose residual adds sit in sub-modules but whose
    attention and intermediate MLP do not, is a block). With ``blocks`` (a glob or
    a list of globs over module paths), the outermost modules matching are the blocks, and each must be
    a residual block. Errors are ``OptionError`` naming ``method`` and the option ``blocks``.
    """
    members = module_members(gm)
    types = module_types(gm)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}

    def analyse(path: str) -> Block | str:
        return _analyse(gm, path, members[path], 0, types.get(module_path(path), ""))

    if blocks is None:
        candidates = {p: b for p in members if isinstance(b := analyse(p), Block)}
        chosen: list[str] = []
        for path in sorted(candidates, key=lambda p: (p.count("."), order[members[p][0]])):
            if any(path.startswith(c + ".") for c in chosen):
                continue
            if _is_container(path, candidates, members):
                continue
            chosen.append(path)
        if not chosen:
            modules = ", ".join(sorted(members)) or "none (the graph carries no nn_module_stack)"
            raise OptionError(
                f"method {method!r}: found no residual block (a module computing x + f(x, extras) from one "
                f"residual-stream input x, returning one tensor of x's shape) in the model; its modules: "
                f"{modules}. Name the blocks with blocks='<module glob>' or use a model with residual blocks"
            )
        found = [candidates[p] for p in chosen]
    else:
        patterns = [blocks] if isinstance(blocks, str) else list(blocks)
        if not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise OptionError(f"method {method!r}: option blocks={blocks!r} is invalid; use a module-path glob "
                              "like 'layers.*' or a list of them")
        unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(m, p) for m in members)]
        if unmatched:
            raise OptionError(f"method {method!r}: option blocks pattern {unmatched[0]!r} matches no module; "
                              f"modules in the graph: {', '.join(sorted(members)) or 'none'}")
        matched = _outermost([m for m in members if any(fnmatch.fnmatchcase(m, p) for p in patterns)])
        found = []
        for path in matched:
            block = analyse(path)
            if isinstance(block, str):
                raise OptionError(f"method {method!r}: option blocks={blocks!r} names module {path!r}, which is "
                                  f"not a residual block: {block}")
            found.append(block)
    found.sort(key=lambda b: order[next(n for n in gm.graph.nodes if n.name == b.output)])
    return [Block(i, b.path, b.module_type, b.input, b.output, b.residual_adds, b.parameters, b.extras)
            for i, b in enumerate(found)]


def resolve_blocks(gm: torch.fx.GraphModule, paths: Sequence[str], method: str) -> list[Block]:
    """The blocks at ``paths`` in ``gm`` (a copy or rewrite of the graph they were found in)."""
    found, types = module_members(gm), module_types(gm)
    result = []
    for i, path in enumerate(paths):
        block = (_analyse(gm, path, found[path], i, types.get(module_path(path), "")) if path in found
                 else "absent")
        if isinstance(block, str):
            raise OptionError(f"method {method!r}: block {path!r} is no longer a residual block in this graph "
                              f"({block}); another method changed it")
        result.append(block)
    return result
