"""``graphopt bench`` cases against HuggingFace PEFT, and the conv adapters' design choice.

``bench_peft`` ("peft"): hra, oftv2 and lora through graphopt against PEFT's HRA, OFT and LoRA on the same
model and data in one process. Model: 4 blocks of Linear(1024, 1024) + GELU, input (32, 64, 1024) (quick:
Linear(256), input (8, 32, 256)), MSE to a fixed random target, adapters on every linear layer, AdamW
(lr 1e-3) everywhere. Settings matched: hra r = 8; oftv2 block 32 with K = 4 Neumann terms = PEFT OFT
``oft_block_size=32, num_cayley_neumann_terms=5`` (the same series, docs/methods/oftv2.md); lora r = 8,
alpha = 16. Variants per method: ``graphopt`` (inductor), ``peft_eager`` (PEFT model, eager,
``torch.optim.AdamW``), ``peft_compiled`` (the PEFT model under ``torch.compile``, eager optimizer). Time:
median ms/step; memory (full mode only): the profiler's peak, which sees PEFT's eager tensors but not the
buffers inside compiled code (so only ``peft_eager`` against graphopt's eager backend is like for like:
``graphopt_eager_mib``).

``bench_conv`` ("peft: conv adapters"): why hra / oftv2 adapt Conv2d layers weight-centric. A 3×3 conv
stack (4 × Conv2d(64, 64, 3, padding 1) + GELU, input (16, 64, 32, 32); quick: (4, 32, 16, 16)) and a 1×1
one, HRA r = 8, SGD. Variants: ``weight_centric`` (the built-in: ``W′ = W R`` formed each step, then the
conv), ``input_centric`` (3×3: the unfolded patches rotated, ``x Rᵀ`` on ``C·9`` values per output pixel,
then a matmul; 1×1: the channels rotated, then the conv), both graphopt-compiled (inductor), and for the
3×3 stack PEFT's HRA conv (eager).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.bench import peak_memory_mib, ratios, time_steps
from graphopt.builtin.hra import hra_transform, paired_init
from graphopt.rewrite.adapters import insert_input_transform

from .common import eager_training_step, linear_gelu_stack, many_compiled_peft_models

LR = 1e-3


def _peft_configs(paths: list[str]) -> dict[str, Any]:
    import peft

    return {"hra": peft.HRAConfig(r=8, target_modules=paths),
            "oftv2": peft.OFTConfig(r=0, oft_block_size=32, num_cayley_neumann_terms=5, target_modules=paths),
            "lora": peft.LoraConfig(r=8, lora_alpha=16, target_modules=paths)}


SPECS = {"hra": "hra(r=8)", "oftv2": "oftv2(block_size=32, neumann_terms=4)", "lora": "lora(r=8, alpha=16)"}


def _peft_steps(base: nn.Module, config: Any, x: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
    import peft

    steps = {}
    for name, compiled in (("peft_eager", False), ("peft_compiled", True)):
        model = peft.get_peft_model(copy.deepcopy(base), config)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        steps[name] = eager_training_step(torch.compile(model) if compiled else model, optimizer, x, target)
    return steps


@many_compiled_peft_models()
def bench_peft(quick: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    width, shape = (256, (8, 32, 256)) if quick else (1024, (32, 64, 1024))
    base = linear_gelu_stack(width)
    x, target = torch.randn(shape), torch.randn(shape)
    paths = [name for name, module in base.named_modules() if isinstance(module, nn.Linear)]
    configs = _peft_configs(paths)
    steps = 10 if quick else 20
    results: dict[str, Any] = {"input": list(shape), "steps": steps}
    for method, spec in SPECS.items():
        m = graphopt.compile(base, methods=[spec, f"adamw(lr={LR})"], loss_fn=F.mse_loss, example_inputs=(x,))
        variants = {"graphopt": lambda m=m: m.step(x, target), **_peft_steps(base, configs[method], x, target)}
        times = time_steps(variants, steps=steps, warmup=3, block=5, progress=False)
        entry: dict[str, Any] = {"step_ms": {k: round(v, 2) for k, v in times.items()},
                                 "ratio_vs_peft_eager": ratios(times, "peft_eager"),
                                 "ratio_vs_peft_compiled": ratios(times, "peft_compiled")}
        if not quick:
            eager = graphopt.compile(base, methods=[spec, f"adamw(lr={LR})"], loss_fn=F.mse_loss,
                                     example_inputs=(x,), backend="eager")
            entry["peak_mib"] = {name: round(peak_memory_mib(fn), 1) for name, fn in variants.items()}
            entry["graphopt_eager_mib"] = round(peak_memory_mib(lambda eager=eager: eager.step(x, target)), 1)
        results[method] = entry
    return results


# -- the conv adapters' design choice ---------------------------------------------------------------------
def hra_unfold_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, u: torch.Tensor,
                    padding: int) -> torch.Tensor:
    """Input-centric HRA on a stride-1 3×3 conv: rotate each unfolded patch (``x Rᵀ``), then one matmul."""
    batch, _, height, width = x.shape
    patches = hra_transform(F.unfold(x, weight.shape[2:], padding=padding).transpose(1, 2), u)
    y = patches @ weight.reshape(weight.shape[0], -1).t()
    y = y if bias is None else y + bias
    return y.transpose(1, 2).reshape(batch, weight.shape[0], height, width)


def hra_channels(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Input-centric HRA on a 1×1 conv: rotate the channels of every pixel."""
    return hra_transform(x.movedim(1, -1), u).movedim(-1, 1)


class InputCentricHRA(graphopt.Method):
    """Bench only: HRA on every Conv2d, input-centric (unfolded patches for 3×3, channels for 1×1)."""

    name = "bench-hra-input-centric"

    def __init__(self, r: int = 8) -> None:
        self.r = r

    def apply(self, gm: torch.fx.GraphModule, ctx: graphopt.MethodContext) -> None:
        for layer in ctx.select(None, kinds=("conv2d",), what="conv2d"):
            weight = ctx.parameter(layer.weight.target)
            u = ctx.add_parameter(layer.path, "u", paired_init(layer.in_features, self.r, weight.dtype))
            if weight.shape[-1] == 1:
                insert_input_transform(ctx, layer, hra_channels, [u])
                continue
            with gm.graph.inserting_before(layer.node):
                node = gm.graph.call_function(hra_unfold_conv, (layer.node.args[0], layer.weight, layer.bias,
                                                                ctx.get_attr(u, layer.node)),
                                              {"padding": layer.conv_options["padding"][0]})
            layer.node.replace_all_uses_with(node)
            gm.graph.erase_node(layer.node)


class _Plugin:
    @graphopt.hookimpl
    def graphopt_register_methods(self, register):
        register(InputCentricHRA)


def _conv_stack(kernel: int, channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Conv2d(channels, channels, kernel, padding=kernel // 2), nn.GELU()]
    return nn.Sequential(*layers)


def bench_conv(quick: bool) -> dict[str, Any]:
    import peft

    torch.manual_seed(0)
    shape = (4, 32, 16, 16) if quick else (16, 64, 32, 32)
    x, target = torch.randn(shape), torch.randn(shape)
    steps = 10 if quick else 20
    results: dict[str, Any] = {"input": list(shape), "steps": steps}
    plugin = graphopt.register_plugin(_Plugin(), name="bench-conv-adapters")
    try:
        for kernel in (3, 1):
            base = _conv_stack(kernel, shape[1])
            targets = [str(i) for i in range(0, 8, 2)]
            compiled = {name: graphopt.compile(base, methods=[spec, "sgd(lr=1e-3)"], loss_fn=F.mse_loss,
                                               example_inputs=(x,))
                        for name, spec in (("weight_centric", f"hra(r=8, targets={targets!r})"),
                                           ("input_centric", "bench-hra-input-centric(r=8)"))}
            variants = {name: (lambda m=m: m.step(x, target)) for name, m in compiled.items()}
            if kernel == 3:
                model = peft.get_peft_model(copy.deepcopy(base), peft.HRAConfig(r=8, target_modules=targets))
                optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
                variants["peft_eager"] = eager_training_step(model, optimizer, x, target)
            times = time_steps(variants, steps=steps, warmup=3, block=5, progress=False)
            results[f"{kernel}x{kernel}"] = {"step_ms": {k: round(v, 2) for k, v in times.items()},
                                             "ratio_vs_weight_centric": ratios(times, "weight_centric")}
    finally:
        graphopt.unregister_plugin(plugin)
    return results
