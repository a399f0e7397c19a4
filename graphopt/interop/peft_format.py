"""PEFT's adapter format and graphopt's adapter methods, one mapping per method (tensors per layer path).

- ``lora(r, alpha, dropout, use_rslora)`` ↔ ``LORA`` (``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``):
  ``lora_A.weight`` = A, ``lora_B.weight`` = B.
- ``sora`` (saved only) → ``LORA`` on the active ranks, gate folded: ``lora_A.weight`` = (alpha/r)·diag(g)A,
  ``lora_B.weight`` = B, and ``rank_pattern`` = ``alpha_pattern`` = r′ per layer (scaling 1).
- ``hra(r, apply_gs)`` ↔ ``HRA`` (``r``, ``apply_GS``): ``hra_u`` = u.
- ``oftv2(block_size=b, neumann_terms=K)`` ↔ ``OFT`` (``oft_block_size = b``, ``use_cayley_neumann = K > 0``,
  ``num_cayley_neumann_terms = K + 1``): ``oft_R.weight`` = q (−q for K = 0).

OFT's series: PEFT's ``N`` terms compute ``I + 2Σ_{i=1}^{N−2} Q^i + Q^{N−1}``, which is our ``(I + Q)Σ_{i<K} Q^i`` for
``K = N − 1`` when ``N ≥ 4`` (PEFT's ``N = 3`` computes the same as its ``N = 4``; ``N ≤ 2`` and our ``K ∈ {1, 2}`` have
no counterpart). PEFT's exact branch is ``(I − Q)(I + Q)⁻¹``, ours ``(I + Q)(I − Q)⁻¹``: the same rotation for −q.
A PEFT setting graphopt cannot reproduce is an error naming it.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from graphopt.errors import GraphoptError
from graphopt.rewrite.layers import LayerCall

Tensors = dict[str, dict[str, torch.Tensor]]  # layer path -> {name: tensor}
COMMON = {"bias": "none"}
UNSUPPORTED = {  # settings whose PEFT defaults are the only values graphopt reproduces
    "LORA": {**COMMON, "use_dora": False, "lora_bias": False, "layer_replication": None, "alpha_pattern": {},
             "rank_pattern": {}, "trainable_token_indices": None, "target_parameters": None, "use_qalora": False,
             "alora_invocation_tokens": None, "use_bdlora": None, "arrow_config": None, "megatron_config": None},
    "HRA": dict(COMMON),
    "OFT": {**COMMON, "coft": False, "block_share": False, "module_dropout": 0.0},
}


def check_settings(config: Mapping[str, Any]) -> str:
    """The PEFT type of ``config``; an error naming the first setting graphopt cannot reproduce."""
    kind = str(config.get("peft_type", ""))
    if kind not in UNSUPPORTED:
        raise GraphoptError(f"PEFT setting peft_type={kind!r} is not supported: graphopt reads LORA, HRA and OFT")
    for name, default in UNSUPPORTED[kind].items():
        value = config.get(name, default)
        if value != default and (value or default):
            raise GraphoptError(f"PEFT setting {name}={value!r} is not supported for {kind} (only {name}={default!r})")
    return kind


# -- graphopt -> PEFT --------------------------------------------------------------------------------------
def _lora_out(method: Any, params: Tensors, layers: Mapping[str, LayerCall]) -> tuple[dict[str, Any], Tensors]:
    tensors = {path: {"lora_A.weight": p["A"], "lora_B.weight": p["B"]} for path, p in params.items()}
    config = {"peft_type": "LORA", "r": method.r, "lora_alpha": method.alpha, "lora_dropout": method.dropout,
              "use_rslora": method.use_rslora, "fan_in_fan_out": _fan_in_fan_out(params, layers)}
    return config, tensors


def _sora_out(method: Any, params: Tensors, layers: Mapping[str, LayerCall]) -> tuple[dict[str, Any], Tensors]:
    scale = method.alpha / method.r
    tensors, ranks = {}, {}
    for path, p in params.items():
        active = p["gate"] != 0
        if int(active.sum()):
            ranks[path] = int(active.sum())
            tensors[path] = {"lora_A.weight": (p["A"] * (p["gate"] * scale)[:, None])[active],
                             "lora_B.weight": p["B"][:, active]}
    if not tensors:
        raise GraphoptError("save_pretrained: every sora gate is zero, so there is no adapter to save")
    r = max(ranks.values())
    pattern = {path: rank for path, rank in ranks.items() if rank != r}
    config = {"peft_type": "LORA", "r": r, "lora_alpha": r, "lora_dropout": 0.0, "use_rslora": False,
              "rank_pattern": pattern, "alpha_pattern": dict(pattern),
              "fan_in_fan_out": _fan_in_fan_out(tensors, layers)}
    return config, tensors


def _hra_out(method: Any, params: Tensors, layers: Mapping[str, LayerCall]) -> tuple[dict[str, Any], Tensors]:
    for path in params:
        layer = layers[path]
        if layer.kind == "addmm":
            raise GraphoptError(f"save_pretrained: PEFT's HRA has no transformers Conv1D layers, and {path!r} is one")
        if layer.kind == "conv2d":
            options, kernel = layer.conv_options, layer.weight_shape[2:]
            if options["groups"] != 1:
                raise GraphoptError(f"save_pretrained: PEFT's HRA refuses Conv2d with groups > 1 ({path!r})")
            if kernel[0] != kernel[1] or list(options["dilation"]) != [1, 1] or len(set(options["stride"])) > 1 \
                    or len(set(options["padding"])) > 1:
                warnings.warn(f"PEFT's HRA runs conv {path!r} with a square kernel, stride[0], padding[0] and no "
                              "dilation: its outputs will differ from this adapter's (docs/peft.md)", stacklevel=3)
    config = {"peft_type": "HRA", "r": method.r, "apply_GS": method.apply_gs, "init_weights": True}
    return config, {path: {"hra_u": p["u"]} for path, p in params.items()}


def _oftv2_out(method: Any, params: Tensors, layers: Mapping[str, LayerCall]) -> tuple[dict[str, Any], Tensors]:
    k = method.neumann_terms
    if k in (1, 2):
        raise GraphoptError(f"save_pretrained: oftv2 neumann_terms={k} has no PEFT OFT counterpart (PEFT's N terms "
                            "are ours with K = N - 1 for N >= 4): use neumann_terms=0 or >= 3")
    for path in params:
        layer = layers[path]
        if layer.kind == "addmm":
            raise GraphoptError(f"save_pretrained: PEFT's OFT has no transformers Conv1D layers, and {path!r} is one")
        if layer.kind == "conv2d":
            kernel, options = layer.weight_shape[2:], layer.conv_options
            if kernel[0] != kernel[1] or list(options["dilation"]) != [1, 1]:
                raise GraphoptError(f"save_pretrained: PEFT's OFT refuses conv {path!r} (a non-square kernel or "
                                    "dilation > 1)")
            if kernel[0] > 1:
                warnings.warn(f"PEFT's unmerged OFT forward is wrong for conv {path!r} (kernel > 1, docs/peft.md): "
                              "after PeftModel.from_pretrained, merge_and_unload() reproduces this adapter",
                              stacklevel=3)
    sign = -1.0 if k == 0 else 1.0
    # peft_version: the first PEFT with this series (older ones summed I + 2Σ_{i<N} Q^i and warn about it)
    config = {"peft_type": "OFT", "peft_version": "0.18.0", "r": 0, "oft_block_size": method.block_size,
              "use_cayley_neumann": k > 0, "num_cayley_neumann_terms": k + 1 if k else 5, "module_dropout": 0.0,
              "coft": False, "eps": 6e-5, "block_share": False, "init_weights": True}
    return config, {path: {"oft_R.weight": sign * p["q"]} for path, p in params.items()}


def _fan_in_fan_out(params: Mapping[str, Any], layers: Mapping[str, LayerCall]) -> bool:
    return all(layers[path].kind == "addmm" for path in params)


SAVERS: dict[str, Callable[..., tuple[dict[str, Any], Tensors]]] = {
    "lora": _lora_out, "sora": _sora_out, "hra": _hra_out, "oftv2": _oftv2_out}


# -- PEFT -> graphopt --------------------------------------------------------------------------------------
def _expect(tensors: Tensors, names: tuple[str, ...], kind: str) -> None:
    for path, found in tensors.items():
        if set(found) != set(names):
            raise GraphoptError(f"PEFT {kind} adapter: layer {path!r} has tensors {sorted(found)}, graphopt reads "
                                f"{list(names)} (an adapter on a layer type graphopt's method does not adapt?)")


def _lora_in(config: Mapping[str, Any], tensors: Tensors) -> tuple[tuple[str, dict], Tensors]:
    _expect(tensors, ("lora_A.weight", "lora_B.weight"), "LORA")
    r = int(config["r"])
    for path, found in tensors.items():
        if found["lora_A.weight"].dim() != 2 or found["lora_A.weight"].shape[0] != r:
            raise GraphoptError(f"PEFT LORA adapter: layer {path!r} has lora_A of shape "
                                f"{tuple(found['lora_A.weight'].shape)}; graphopt's lora adapts linear layers of "
                                f"rank r={r}")
    options = {"r": r, "alpha": config.get("lora_alpha", 8), "dropout": float(config.get("lora_dropout", 0.0)),
               "use_rslora": bool(config.get("use_rslora", False)), "targets": sorted(tensors)}
    state = {path: {"A": t["lora_A.weight"], "B": t["lora_B.weight"]} for path, t in tensors.items()}
    return ("lora", options), state


def _hra_in(config: Mapping[str, Any], tensors: Tensors) -> tuple[tuple[str, dict], Tensors]:
    _expect(tensors, ("hra_u",), "HRA")
    r = int(config["r"])
    if r % 2:
        raise GraphoptError(f"PEFT setting r={r} is not supported for HRA: graphopt's hra needs an even r")
    options = {"r": r, "apply_gs": bool(config.get("apply_GS", False)), "targets": sorted(tensors)}
    return ("hra", options), {path: {"u": t["hra_u"]} for path, t in tensors.items()}


def _oft_in(config: Mapping[str, Any], tensors: Tensors) -> tuple[tuple[str, dict], Tensors]:
    _expect(tensors, ("oft_R.weight",), "OFT")
    sizes = {path: (1 + math.isqrt(1 + 8 * t["oft_R.weight"].shape[1])) // 2 for path, t in tensors.items()}
    if len(set(sizes.values())) > 1:
        raise GraphoptError(f"PEFT setting oft_block_size differs between layers ({sizes}); graphopt's oftv2 uses "
                            "one block size")
    if config.get("use_cayley_neumann", True):
        version = tuple(int(part) for part in re.findall(r"\d+", str(config.get("peft_version", "0")))[:2])
        if version < (0, 18):
            warnings.warn("this OFT adapter predates PEFT 0.18, whose Cayley–Neumann series differs slightly: it is "
                          "loaded with the newer series, as PEFT itself does", stacklevel=3)
        terms = int(config.get("num_cayley_neumann_terms", 5))
        if terms <= 2:
            raise GraphoptError(f"PEFT setting num_cayley_neumann_terms={terms} is not supported for OFT (no oftv2 "
                                "counterpart; use >= 3)")
        k, sign = max(terms - 1, 3), 1.0
    else:
        k, sign = 0, -1.0
    options = {"block_size": next(iter(sizes.values())), "neumann_terms": k, "targets": sorted(tensors)}
    return ("oftv2", options), {path: {"q": sign * t["oft_R.weight"]} for path, t in tensors.items()}


LOADERS: dict[str, Callable[..., tuple[tuple[str, dict], Tensors]]] = {"LORA": _lora_in, "HRA": _hra_in,
                                                                         "OFT": _oft_in}
