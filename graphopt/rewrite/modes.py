"""Copies of a captured graph that share its parameters: plain (step variants), and the inference form
(dropout off — attention dropout too —, batch norm on running statistics).

``torch.export`` records the training-mode ops (``aten.dropout(x, p, train=True)``,
``aten.batch_norm(..., training=True, ...)``, and attention dropout as the ``dropout_p`` of
``aten.scaled_dot_product_attention``, which models set to 0 in eval mode) and an exported GraphModule
refuses ``.eval()``, so the inference graph is a copy with those switched: train flags off, ``dropout_p``
0, batch-norm counters gone, stochastic-depth products (``graphopt.rewrite.drop_path``) replaced by their
input. Capture checks the result against the model's own eval mode.
"""

from __future__ import annotations

import torch

from graphopt.rewrite.drop_path import remove_drop_paths

aten = torch.ops.aten
_TRAIN_FLAG = {aten.dropout.default: 2, aten.batch_norm.default: 5, aten.feature_dropout.default: 2,
               aten.alpha_dropout.default: 2, aten.feature_alpha_dropout.default: 2,
               # in-place forms (nn.Dropout(inplace=True): MobileNetV2's classifier, p=0.8)
               aten.dropout_.default: 2, aten.feature_dropout_.default: 2, aten.alpha_dropout_.default: 2,
               aten.feature_alpha_dropout_.default: 2}
_SDPA = aten.scaled_dot_product_attention.default
_SDPA_DROPOUT = 4  # (query, key, value, attn_mask, dropout_p, ...)


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule with a copy of ``gm``'s graph (same node names and meta) sharing its parameters."""
    graph = torch.fx.Graph()
    mapping: dict[torch.fx.Node, torch.fx.Node] = {}
    output = graph.graph_copy(gm.graph, mapping)
    graph.output(output)
    graph._codegen = gm.graph._codegen
    copy = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    copy.meta.update(gm.meta)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            setattr(copy, attr, getattr(gm, attr))
    return copy



def inference_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule sharing ``gm``'s parameters whose graph runs in inference mode."""
    inference = copy_graph_module(gm)
    graph = inference.graph
    for node in list(graph.nodes):
        index = _TRAIN_FLAG.get(node.target)
        if index is not None and len(node.args) > index:
            node.update_arg(index, False)
        elif node.target is _SDPA:
            if len(node.args) > _SDPA_DROPOUT:
                node.update_arg(_SDPA_DROPOUT, 0.0)
            elif "dropout_p" in node.kwargs:
                node.update_kwarg("dropout_p", 0.0)
        elif node.target is aten.add_.Tensor and _is_batch_counter(node):
            graph.erase_node(node)
    remove_drop_paths(inference)  # stochastic depth written as tensor ops: x in inference
    inference.training = False  # the flag only: an exported GraphModule refuses .eval()
    inference.recompile()
    return inference


def _is_batch_counter(node: torch.fx.Node) -> bool:
    target = node.args[0]
    return (not node.users and isinstance(target, torch.fx.Node) and target.op == "get_attr"
            and str(target.target).endswith("num_batches_tracked"))
