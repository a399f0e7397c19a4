"""Graph edits on residual blocks (see :mod:`graphopt.rewrite.blocks`): remove a block, stop backward at
its input, scale its residual branches; and which parameters a graph still trains. Each edit works in
place, on a copy made by :func:`graphopt.rewrite.modes.copy_graph_module` (it shares the parameters).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graphopt.rewrite.blocks import Block, canonical_names, module_members
from graphopt.rewrite.meta import is_cut, mark_cut

aten = torch.ops.aten


def drop_blocks(gm: torch.fx.GraphModule, blocks: Sequence[Block]) -> None:
    """Remove ``blocks`` from ``gm`` in place: each block's output is replaced by its input (``x + f(x) → x``)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    found = module_members(gm)
    for block in sorted(blocks, key=lambda b: -b.index):
        region = set(found[block.path])
        x_in, x_out = nodes[block.input], nodes[block.output]
        x_out.replace_all_uses_with(x_in, delete_user_cb=lambda user, region=region: user not in region)
        for node in reversed(found[block.path]):
            if not node.users:
                gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


def detach_input(gm: torch.fx.GraphModule, block: Block) -> None:
    """Insert ``detach`` on ``block``'s input in place, so backward stops there."""
    x_in = next(n for n in gm.graph.nodes if n.name == block.input)
    with gm.graph.inserting_after(x_in):
        cut = gm.graph.call_function(aten.detach.default, (x_in,))
    cut.meta.update({k: v for k, v in x_in.meta.items() if k == "val"})
    mark_cut(cut)
    x_in.replace_all_uses_with(cut, delete_user_cb=lambda user: user is not cut)
    gm.graph.lint()
    gm.recompile()


def scale_branches(gm: torch.fx.GraphModule, block: Block, factor: float) -> None:
    """Turn each residual add of ``block`` in ``gm`` into ``x + factor·f(x)``, in place."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for add_name, branch_name in block.residual_adds:
        add, branch = nodes[add_name], nodes[branch_name]
        with gm.graph.inserting_before(add):
            scaled = gm.graph.call_function(aten.mul.Tensor, (branch, factor))
        scaled.meta.update({k: v for k, v in branch.meta.items() if k in ("val", "nn_module_stack")})
        add.replace_input_with(branch, scaled)
    gm.graph.lint()
    gm.recompile()


def trained_parameters(gm: torch.fx.GraphModule) -> set[str]:
    """Qualified names of the parameters the output depends on other than through a layerdrop cut."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    seen, stack = set(), [output]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if not is_cut(node):
            stack.extend(node.all_input_nodes)
    names: set[str] = set()
    for node in seen:
        if node.op == "get_attr":
            names.add(node.target)
        elif node.op == "call_module":
            names.update(f"{node.target}.{n}" for n, _ in gm.get_submodule(node.target).named_parameters())
    return set(canonical_names(gm, sorted(names)))
