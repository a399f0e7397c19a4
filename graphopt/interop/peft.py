"""PEFT checkpoints both ways: ``m.save_pretrained(dir)`` and ``graphopt.from_peft(model, dir_or_peft_model)``.

PEFT writes one adapter as ``adapter_config.json`` plus ``adapter_model.safetensors``, the tensors keyed
``base_model.model.<module path>.<tensor>`` (``lora_A.weight``, ``hra_u``, ``oft_R.weight``; the mapping to
graphopt's methods is :mod:`graphopt.interop.peft_format`). Module paths are those of the model PEFT wraps;
``submodule=`` names it when graphopt compiled a wrapper around it (``"model"`` for ``Wrapper(model=hf)``).
Base modules that train whole (``trainable=``) are PEFT's ``modules_to_save`` (:mod:`graphopt.interop.peft_modules`).
Reading needs no ``peft`` installed for a directory; a ``PeftModel`` is read through ``peft`` itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from graphopt.errors import GraphoptError, OptionError
from graphopt.interop.peft_format import LOADERS, SAVERS, Tensors, check_settings
from graphopt.interop.peft_modules import check_adapters_outside, module_tensors, modules_to_save, split_module_tensors
from graphopt.rewrite.layers import layer_calls

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def _peft_path(path: str, submodule: str) -> str:
    if not submodule:
        return path
    if not path.startswith(submodule + "."):
        raise GraphoptError(f"save_pretrained: adapted layer {path!r} lies outside submodule={submodule!r}")
    return path[len(submodule) + 1:]


def adapter_tensors(gm: torch.fx.GraphModule, methods: Iterable[Any]) -> dict[str, tuple[Any, Tensors]]:
    """Per method that added parameters: the method and ``{layer path: {name: tensor}}`` of them."""
    found: dict[str, tuple[Any, Tensors]] = {}
    by_name = {m.name: m for m in methods}
    for qualified, param in gm.named_parameters():
        path, _, attr = qualified.rpartition(".")
        for name, method in by_name.items():
            if attr.startswith(name + "_"):
                tensors = found.setdefault(name, (method, {}))[1]
                tensors.setdefault(path, {})[attr[len(name) + 1:]] = param.detach()
    return found


def save_pretrained(directory: str | Path, gm: torch.fx.GraphModule, methods: Iterable[Any],
                    trainable_base: Iterable[str] = (), submodule: str = "", base_model_name: str | None = None,
                    structure: nn.Module | None = None) -> Path:
    """Write the one adapter method of ``gm`` as a PEFT adapter in ``directory``; returns the directory.
    ``trainable_base``: the base parameters that train, written as PEFT's ``modules_to_save`` (whole modules of
    ``structure``, the original model, only)."""
    from safetensors.torch import save_file

    trainable_base = sorted(trainable_base)
    if trainable_base and structure is None:
        raise GraphoptError("save_pretrained: trainable base parameters need the original model's structure")
    saved_modules = modules_to_save(structure, trainable_base, submodule) if trainable_base else []
    adapters = adapter_tensors(gm, methods)
    if len(adapters) != 1:
        raise GraphoptError(f"save_pretrained writes one PEFT adapter; this model has "
                            f"{len(adapters)} adapter method(s) {sorted(adapters)}")
    name, (method, params) = next(iter(adapters.items()))
    if name not in SAVERS:
        raise GraphoptError(f"save_pretrained: PEFT has no counterpart of method {name!r} "
                            f"(graphopt writes {', '.join(sorted(SAVERS))})")
    layers = {layer.path: layer for layer in layer_calls(gm)}
    config, tensors = SAVERS[name](method, params, layers)
    check_adapters_outside(tensors, saved_modules)
    paths = {path: _peft_path(path, submodule) for path in tensors}
    for key in ("rank_pattern", "alpha_pattern"):
        if key in config:
            config[key] = {paths[p]: v for p, v in config[key].items()}
    config.update({"target_modules": sorted(paths.values()), "base_model_name_or_path": base_model_name,
                   "task_type": None, "inference_mode": True, "bias": "none",
                   "modules_to_save": [_peft_path(m, submodule) for m in saved_modules] or None,
                   "revision": None})
    flat = {f"{PREFIX}{paths[path]}.{key}": value.contiguous().clone()
            for path, named in tensors.items() for key, value in named.items()}
    flat.update({f"{PREFIX}{_peft_path(name, submodule)}": value.contiguous().clone()
                 for name, value in module_tensors(gm, structure, saved_modules).items()})
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(flat, str(directory / WEIGHTS_FILE))
    return directory


def read_adapter(source: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config, {PEFT key: tensor})`` from a PEFT adapter directory or a ``peft.PeftModel`` (its active adapter)."""
    if hasattr(source, "peft_config") and hasattr(source, "active_adapter"):
        from peft.utils import get_peft_model_state_dict

        name = source.active_adapter
        config = {k: getattr(v, "value", v) for k, v in source.peft_config[name].to_dict().items()}
        return config, dict(get_peft_model_state_dict(source, adapter_name=name))
    directory = Path(source)
    if not (directory / CONFIG_FILE).is_file():
        raise OptionError(f"from_peft: {source!r} is neither a peft.PeftModel nor a directory with {CONFIG_FILE}")
    config = json.loads((directory / CONFIG_FILE).read_text())
    if (directory / WEIGHTS_FILE).is_file():
        from safetensors.torch import load_file

        return config, load_file(str(directory / WEIGHTS_FILE))
    bin_file = directory / "adapter_model.bin"
    if not bin_file.is_file():
        raise OptionError(f"from_peft: {directory} has no {WEIGHTS_FILE} (nor adapter_model.bin)")
    return config, torch.load(bin_file, map_location="cpu", weights_only=True)


class PeftAdapter(NamedTuple):
    """A PEFT adapter in graphopt's terms: the method ``spec``, its ``state`` and the ``modules`` to save (their
    paths, ``trainable=`` globs) with their ``module_state``, all under graph names."""

    spec: tuple[str, dict[str, Any]]
    state: dict[str, torch.Tensor]
    modules: list[str]
    module_state: dict[str, torch.Tensor]


def peft_to_graphopt(config: Mapping[str, Any], flat: Mapping[str, torch.Tensor], submodule: str = "") -> PeftAdapter:
    """The graphopt method spec, adapter state and modules to save (graph names) of a PEFT adapter."""
    kind = check_settings(config)
    suffixes = {"LORA": ("lora_A.weight", "lora_B.weight"), "HRA": ("hra_u",), "OFT": ("oft_R.weight",)}[kind]

    def graph_name(path: str) -> str:
        return f"{submodule}.{path}" if submodule else path

    adapter, saved, modules = split_module_tensors(config, flat, PREFIX)
    tensors: Tensors = {}
    for key, value in adapter.items():
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        if not key.startswith(PREFIX) or suffix is None:
            raise GraphoptError(f"PEFT {kind} adapter: tensor {key!r} is not one graphopt reads (an embedding or a "
                                "bias adapter, or a module outside modules_to_save?)")
        tensors.setdefault(graph_name(key[len(PREFIX):-len(suffix) - 1]), {})[suffix] = value
    modules = [graph_name(m) for m in modules]
    check_adapters_outside(tensors, modules)
    spec, state = LOADERS[kind](config, tensors)
    name = spec[0]
    return PeftAdapter(spec, {f"{path}.{name}_{key}": value for path, named in state.items()
                              for key, value in named.items()},
                       modules, {graph_name(k): v for k, v in saved.items()})


def from_peft(model: nn.Module, source: Any, methods: Iterable[Any] | str = (), *,
              example_inputs: tuple[Any, ...] | None = None, submodule: str = "", **compile_options: Any) -> Any:
    """A compiled model of ``model`` with the PEFT adapter ``source`` (a directory or a ``PeftModel``) as the
    matching graphopt method, its weights loaded, plus ``methods`` (an optimizer, ...); other keywords go to
    ``graphopt.compile``. ``model`` is the plain base model (never modified). The adapter's ``modules_to_save``
    train (added to ``trainable=``) and start from the adapter's values of them."""
    from graphopt.api import compile as compile_model

    if example_inputs is None:
        raise OptionError("from_peft needs example_inputs= (the model is captured to load the adapter into it)")
    config, flat = read_adapter(source)
    adapter = peft_to_graphopt(config, flat, submodule)
    extra = [methods] if isinstance(methods, str) else list(methods)
    if adapter.modules:
        given = compile_options.get("trainable", ())
        given = [given] if isinstance(given, str) else list(given)
        compile_options["trainable"] = [*given, *(m for m in adapter.modules if m not in given)]
    compiled = compile_model(model, methods=[adapter.spec, *extra], example_inputs=example_inputs, **compile_options)
    buffers = dict(compiled.graph_module.named_buffers())
    compiled.load_adapter_state_dict({**adapter.state, **{k: v for k, v in adapter.module_state.items()
                                                          if k not in buffers}}, strict=False)
    with torch.no_grad():
        for name, value in adapter.module_state.items():
            if name in buffers:
                buffers[name].copy_(value.to(dtype=buffers[name].dtype, device=buffers[name].device))
    return compiled
