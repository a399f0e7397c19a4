"""PEFT's ``modules_to_save`` both ways: whole base modules that train beside the adapter.

PEFT wraps each such module in a ``ModulesToSaveWrapper`` holding a trainable copy, and saves the copy's
``state_dict`` (parameters and persistent buffers) under the module's own keys,
``base_model.model.<module path>.<key>``; ``adapter_config.json`` lists the module names, which PEFT matches
as suffixes of module paths (``str.endswith``). graphopt's counterpart is ``graphopt.compile(...,
trainable=[...])``: module or parameter globs kept trainable when the adapter freezes the base.

- Saving (:func:`modules_to_save`): the trainable base parameters must make up whole modules, since PEFT saves
  and trains nothing smaller. Each trainable parameter is assigned its outermost enclosing module (inside the
  PEFT-wrapped submodule) whose parameters all train; a parameter with no such module is an error naming it.
- Loading (:func:`split_module_tensors`): a tensor inside a module named in ``modules_to_save`` belongs to its
  outermost such module, which becomes a ``trainable=`` glob; its values are loaded into the compiled model.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from graphopt.errors import GraphoptError


def _ancestors(name: str) -> list[str]:
    """The module paths enclosing parameter ``name``, outermost first (the root ``""`` left out)."""
    parts = name.split(".")[:-1]
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _inside(path: str, module: str) -> bool:
    return not module or path == module or path.startswith(module + ".")


def modules_to_save(structure: nn.Module, trainable: Collection[str], submodule: str = "") -> list[str]:
    """The module paths (graph names, inside ``submodule``) whose parameters are exactly the trainable base
    parameters ``trainable``; ``structure``: the original model (any device, ``meta`` too)."""
    trainable = set(trainable)
    found: set[str] = set()
    partial: list[str] = []
    for name in sorted(trainable):
        if not _inside(name, submodule):
            raise GraphoptError(f"save_pretrained: base parameter {name!r} trains but lies outside the modules of "
                                f"submodule={submodule!r}, so PEFT's modules_to_save cannot hold it")
        candidates = [path for path in _ancestors(name) if path != submodule and _inside(path, submodule)]
        whole = next((path for path in candidates if all(
            f"{path}.{p}" in trainable for p, _ in structure.get_submodule(path).named_parameters(
                remove_duplicate=False))), None)
        if whole is None:
            partial.append(name)
        else:
            found.add(whole)
    if partial:
        owners = sorted({name.rpartition(".")[0] for name in partial})
        shown = ", ".join(partial[:8]) + (", ..." if len(partial) > 8 else "")
        raise GraphoptError(
            f"save_pretrained: base parameters {shown} train, but not their whole modules; PEFT's modules_to_save "
            f"trains and saves whole modules only: train whole modules, e.g. graphopt.compile(..., "
            f"trainable={owners[:3]!r}), or freeze these parameters")
    return sorted(path for path in found if not any(path.startswith(other + ".") for other in found))


def module_tensors(gm: torch.fx.GraphModule, structure: nn.Module, modules: Iterable[str]) -> dict[str, torch.Tensor]:
    """``{graph name: tensor}`` of each module's ``state_dict`` keys (parameters and persistent buffers), as
    PEFT saves a module to save, with the values the compiled model holds now."""
    held = {**dict(gm.named_buffers()), **dict(gm.named_parameters())}
    tensors: dict[str, torch.Tensor] = {}
    for path in modules:
        for key in structure.get_submodule(path).state_dict():
            name = f"{path}.{key}"
            if name not in held:
                raise GraphoptError(f"save_pretrained: module {path!r} to save has {key!r}, which the compiled graph "
                                    "does not hold (a tied weight or an unused buffer?)")
            tensors[name] = held[name].detach()
    return tensors


def check_adapters_outside(adapted: Iterable[str], modules: Iterable[str]) -> None:
    """An adapted layer inside a module to save is refused: PEFT would wrap the adapter in the saved copy."""
    for layer in adapted:
        module = next((m for m in modules if _inside(layer, m)), None)
        if module is not None:
            raise GraphoptError(f"adapted layer {layer!r} lies inside module {module!r}, which also trains whole "
                                "(modules_to_save); graphopt does not combine the two: adapt layers outside it")


def split_module_tensors(config: Mapping[str, Any], flat: Mapping[str, torch.Tensor], prefix: str
                         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """``(adapter tensors, {module path.key: tensor} of the modules to save, their module paths)`` of a PEFT
    adapter's ``flat`` tensors; paths relative to the PEFT-wrapped model."""
    names = config.get("modules_to_save") or []
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
        raise GraphoptError(f"PEFT setting modules_to_save={names!r} is not a list of module names")
    adapter, saved, modules = {}, {}, set()
    for key, value in flat.items():
        path = key[len(prefix):] if key.startswith(prefix) else None
        module = None if path is None else next(
            (p for p in _ancestors(path) if any(p.endswith(n) for n in names)), None)
        if module is None:
            adapter[key] = value
        else:
            saved[path] = value
            modules.add(module)
    return adapter, saved, sorted(modules)
