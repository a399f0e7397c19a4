"""Adapter-only state: the tensors a compiled model holds beyond the original model's own weights.

``adapter_state_dict`` is every parameter the methods added (``<layer path>.<method>_<name>``, trainable or
not) plus every original parameter that trains (a ``modules_to_save``-style choice), under the graph's
names — a few kilobytes where ``state_dict()`` holds the whole model. ``load_adapter_state_dict`` puts such
a dict back into a compiled model of the same methods: all keys must be known, shapes must match, and
with ``strict`` every adapter tensor must be given.
"""

from __future__ import annotations

from collections.abc import Mapping, Set

import torch

from graphopt.errors import CheckpointError


def adapter_names(gm: torch.fx.GraphModule, original: Set[str]) -> list[str]:
    """The graph's parameters that are not the original model's, or that train."""
    return [n for n, p in gm.named_parameters() if n not in original or p.requires_grad]


def adapter_state_dict(gm: torch.fx.GraphModule, original: Set[str]) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` (detached, sharing storage like ``nn.Module.state_dict``) for :func:`adapter_names`."""
    params = dict(gm.named_parameters())
    return {name: params[name].detach() for name in adapter_names(gm, original)}


def load_adapter_state_dict(gm: torch.fx.GraphModule, original: Set[str], state: Mapping[str, torch.Tensor],
                            strict: bool = True) -> None:
    """Copy ``state`` into the adapter parameters, all or nothing (checked completely first)."""
    names = adapter_names(gm, original)
    params = dict(gm.named_parameters())
    unknown = sorted(set(state) - set(names))
    if unknown:
        raise CheckpointError(f"adapter state has unknown key(s) {', '.join(unknown)}; this model's adapter tensors "
                              f"are: {', '.join(names) or 'none'}")
    missing = sorted(set(names) - set(state))
    if strict and missing:
        raise CheckpointError(f"adapter state lacks {', '.join(missing)} (pass strict=False to load only part)")
    for name, value in state.items():
        if tuple(value.shape) != tuple(params[name].shape):
            raise CheckpointError(f"adapter state {name!r} has shape {tuple(value.shape)}, the model's is "
                                  f"{tuple(params[name].shape)} (was the model pruned, or built with other options?)")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(dtype=params[name].dtype, device=params[name].device))
