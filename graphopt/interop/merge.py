"""Back to a plain model: the user's own module class with every adapter folded into its weights.

A compiled model runs a captured graph, not the user's module. To hand a plain module back (PEFT's
``merge_and_unload``), graphopt keeps the *structure* of the original model from capture on: graphopt's own
copy of it moved to the ``meta`` device (classes, submodules, parameter and buffer names, no data).
:func:`merged_module` copies that structure and fills every parameter and buffer from the graph that
``export(merge=True)`` writes, where the methods have folded their adapters into plain weights:

- tied parameters (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) appear once in the graph and
  are filled once, so the tie survives;
- non-persistent buffers (BERT's ``embeddings.position_ids`` and ``embeddings.token_type_ids``) are in the
  graph's state but not in the model's ``state_dict``: they are filled as buffers, never saved, so the
  merged module's ``state_dict`` loads strictly into the original architecture.

The result is checked: in eval mode it must reproduce the exported graph on the captured example inputs.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import _pytree as pytree

from graphopt.errors import GraphoptError
from graphopt.inputs import CallInputs


@dataclass(frozen=True)
class Structure:
    """The original model without data (``module``, on ``meta``) and its parameter and buffer ``names``
    (tied ones under each name). A plain holder, so a compiled model that is itself an ``nn.Module`` does not
    register the template as a submodule."""

    module: nn.Module
    names: frozenset[str]


def original_structure(model: nn.Module) -> Structure:
    """``model`` (graphopt's own copy, which capture no longer needs) moved in place to the ``meta`` device:
    the template :func:`merged_module` fills, and the names that tell adapter tensors from the model's."""
    tied: dict[int, list[str]] = {}
    for name, tensor in _named_tensors(model):
        tied.setdefault(id(tensor), []).append(name)
    model.to("meta")  # a new tensor per attribute: the ties are made again below
    for names in (names for names in tied.values() if len(names) > 1):
        first = model.get_parameter(names[0]) if _is_parameter(model, names[0]) else model.get_buffer(names[0])
        for name in names[1:]:
            _set(model, name, first)
    return Structure(model, frozenset(name for names in tied.values() for name in names))


def _is_parameter(module: nn.Module, name: str) -> bool:
    owner_path, _, attr = name.rpartition(".")
    return attr in (module.get_submodule(owner_path) if owner_path else module)._parameters


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_path, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    if attr in owner._parameters:
        owner._parameters[attr] = value
    else:
        owner._buffers[attr] = value


def merged_module(merged_graph: torch.fx.GraphModule, structure: Structure, example_inputs: CallInputs,
                  atol: float = 1e-5) -> nn.Module:
    """A new module of the original class whose weights are ``merged_graph``'s (``export_graph(merge=True)``).

    Raises :class:`~graphopt.GraphoptError` when the merged graph holds a tensor the original model has no
    place for (a method that does not fold) or when the plain module does not reproduce the graph.
    """
    module = copy.deepcopy(structure.module)
    values = {**dict(merged_graph.named_parameters()), **dict(merged_graph.named_buffers())}
    groups: dict[int, list[str]] = {}
    templates: dict[int, torch.Tensor] = {}
    for name, tensor in _named_tensors(module):
        groups.setdefault(id(tensor), []).append(name)
        templates[id(tensor)] = tensor
    extra = sorted(set(values) - {n for names in groups.values() for n in names})
    if extra:
        raise GraphoptError(f"merged_module: the merged graph still holds {', '.join(extra)}, which "
                            f"{type(module).__name__} has no place for: a method left an adapter unfolded")
    for key, names in groups.items():
        source = next((n for n in names if n in values), None)
        if source is None:
            raise GraphoptError(f"merged_module: {names[0]} of {type(module).__name__} is not in the captured "
                                "graph, so its value is unknown")
        present = [n for n in names if n in values]
        if any(not torch.equal(values[present[0]], values[n]) for n in present[1:]):
            raise GraphoptError(f"merged_module: {type(module).__name__} ties {', '.join(present)} (one tensor), but "
                                "an adapter was folded into only one of them (export unties them so the file is "
                                "right); a plain module of this class cannot hold both: exclude that layer from "
                                "targets, or use graphopt.export")
        value = values[source].detach().clone()
        template = templates[key]
        if isinstance(template, nn.Parameter):
            value = nn.Parameter(value, requires_grad=template.requires_grad)
        for name in names:
            _set(module, name, value)
    _check(module, merged_graph, example_inputs, atol)
    return module


def _check(module: nn.Module, merged_graph: torch.fx.GraphModule, example_inputs: CallInputs,
           atol: float) -> None:
    training = module.training
    module.eval()
    with torch.no_grad():
        expected = pytree.tree_leaves(merged_graph(*example_inputs.args, **example_inputs.kwargs))
        actual = pytree.tree_leaves(module(*example_inputs.args, **example_inputs.kwargs))
    module.train(training)
    pairs = [(e, a) for e, a in zip(expected, actual) if isinstance(e, torch.Tensor)]
    if len(expected) != len(actual) or not pairs:
        raise GraphoptError("merged_module: the plain module's output does not have the exported graph's structure")
    diff = max((e.double() - a.double()).abs().max().item() for e, a in pairs if e.numel())
    scale = max(1.0, max(e.double().abs().max().item() for e, _ in pairs if e.numel()))
    if not diff <= atol * scale:
        raise GraphoptError(f"merged_module: the plain module differs from the exported graph by {diff:.3g} on the "
                            "example inputs: a method changes the inference computation in a way no weight of the "
                            "original model can hold")
