"""``graphopt bench`` cases for stock HF models in ordinary training loops.

``bench_hf_vs_peft_compiled`` ("hf: vs peft+compile"): a BERT-tiny configuration
(``BertForSequenceClassification``, 2 layers, hidden 128, 2 heads, intermediate 512; batch 16 × 128 tokens)
and GPT-2-small (``GPT2LMHeadModel`` with the default ``GPT2Config``: 12 layers, hidden 768; batch 4 × 64;
quick: 2 layers, batch 2 × 32), random init, default dropout, AdamW (lr 1e-4). graphopt ``hra(r=8)``,
``oftv2(block_size=32)``, ``sora(r=8)`` and ``lora(r=8)`` on the attention projections (BERT ``query``,
``value``; GPT-2 ``c_attn``) against PEFT with ``torch.compile`` on the PEFT model and ``torch.optim.AdamW``
— HRA, OFT (block 32, 5 Neumann terms: the same series) and LoRA for BERT; LoRA only for GPT-2, whose
``Conv1D`` projections PEFT's HRA and OFT do not take (SoRA, which PEFT has not, is set beside LoRA).
Reported per model: warm ms/step (interleaved medians), first-step seconds (capture + trace + compile for
graphopt; dynamo + inductor for PEFT), and the ratios; graphopt with ``on_nonfinite="raise"`` (the default)
and ``"apply"``.

``bench_compile_counts`` ("hf: compiles per epoch"): BERT-tiny in a plain loop: one epoch over a DataLoader
(100 examples, batch 16: a ragged last batch of 4), then an eval loop of batch 24 (ragged 4): how many graphs
graphopt traced and compiled, against PEFT + ``torch.compile`` (dynamo's compiles counted).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.bench import ratios, time_steps

from .common import many_compiled_peft_models

LR = 1e-4
SPECS = {"hra": "hra(r=8, targets={t})", "oftv2": "oftv2(block_size=32, targets={t})",
         "sora": "sora(r=8, targets={t})", "lora": "lora(r=8, alpha=16, targets={t})"}


def _globs(targets: list[str]) -> list[str]:
    """graphopt's targets are globs over module paths; PEFT's ``target_modules`` match name suffixes."""
    return [f"*.{t}" for t in targets]


def _models(quick: bool) -> dict[str, tuple[nn.Module, dict[str, torch.Tensor], list[str]]]:
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=512, num_labels=2))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2 if quick else 12, use_cache=False))
    g = torch.Generator().manual_seed(0)
    seq = 32 if quick else 128
    bert_batch = {"input_ids": torch.randint(0, 30522, (16, seq), generator=g),
                  "attention_mask": torch.ones(16, seq, dtype=torch.long), "labels": torch.randint(0, 2, (16,))}
    batch, seq = (2, 32) if quick else (4, 64)
    ids = torch.randint(0, 50257, (batch, seq), generator=g)
    return {"bert-tiny": (bert, bert_batch, ["query", "value"]),
            "gpt2-small": (gpt2, {"input_ids": ids, "labels": ids}, ["c_attn"])}


def _peft_configs(name: str, targets: list[str]) -> dict[str, Any]:
    import peft

    configs = {"lora": peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets)}
    if name == "bert-tiny":
        configs["hra"] = peft.HRAConfig(r=8, target_modules=targets)
        configs["oft"] = peft.OFTConfig(r=0, oft_block_size=32, num_cayley_neumann_terms=5, target_modules=targets)
    return configs


def _timed_first(step: Callable[[], Any]) -> float:
    start = time.perf_counter()
    step()
    return round(time.perf_counter() - start, 2)


def _peft_step(base: nn.Module, config: Any, batch: dict[str, torch.Tensor]) -> Callable[[], Any]:
    import peft

    model = torch.compile(peft.get_peft_model(copy.deepcopy(base), config))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


@many_compiled_peft_models()
def bench_hf_vs_peft_compiled(quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, (base, batch, targets) in _models(quick).items():
        variants: dict[str, Callable[[], Any]] = {}
        first: dict[str, float] = {}
        for method, spec in SPECS.items():
            for policy in ("raise", "apply"):
                m = graphopt.compile(copy.deepcopy(base), methods=[spec.format(t=_globs(targets)), f"adamw(lr={LR})"],
                                     on_nonfinite=policy)
                key = f"graphopt_{method}" + ("" if policy == "raise" else "_apply")
                variants[key] = lambda m=m, batch=batch: m.step(**batch)
                first[key] = _timed_first(variants[key])
        for method, config in _peft_configs(name, targets).items():
            key = f"peft_{method}_compiled"
            variants[key] = _peft_step(base, config, batch)
            first[key] = _timed_first(variants[key])
        times = time_steps(variants, steps=10 if quick else 20, warmup=2, block=5, progress=False)
        baseline = "peft_lora_compiled"
        results[name] = {"ms_per_step": {k: round(v, 1) for k, v in times.items()},
                         "ratio_vs_peft_lora_compiled": ratios(times, baseline),
                         "first_step_s": first,
                         "first_step_ratio_vs_peft_lora": {k: round(v / first[baseline], 2) for k, v in first.items()}}
        if name == "bert-tiny":
            results[name]["ratio_same_method"] = {
                "hra": round(times["graphopt_hra"] / times["peft_hra_compiled"], 3),
                "oftv2": round(times["graphopt_oftv2"] / times["peft_oft_compiled"], 3),
                "lora": round(times["graphopt_lora"] / times["peft_lora_compiled"], 3)}
    return results


@many_compiled_peft_models()
def bench_compile_counts(quick: bool) -> dict[str, Any]:
    import peft
    from torch.utils.data import DataLoader, TensorDataset

    base, _, targets = _models(True)["bert-tiny"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 30522, (100, 32), generator=g)
    data = TensorDataset(ids, torch.ones_like(ids), torch.randint(0, 2, (100,), generator=g))
    m = graphopt.compile(copy.deepcopy(base), methods=[SPECS["hra"].format(t=_globs(targets)), f"adamw(lr={LR})"],
                         loss_fn=lambda out, y: F.cross_entropy(out.logits, y))  # labels stay out of the graph
    start = time.perf_counter()
    for x, mask, y in DataLoader(data, batch_size=16):
        m.step(input_ids=x, attention_mask=mask, labels=y)
    m.eval()
    with torch.no_grad():
        for x, mask, _ in DataLoader(data, batch_size=24):
            m(input_ids=x, attention_mask=mask)
    ours = m.compile_stats()
    graphopt_s = time.perf_counter() - start

    compiles = 0

    def counting(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        nonlocal compiles
        compiles += 1
        return torch._dynamo.lookup_backend("inductor")(gm, example_inputs)

    model = torch.compile(peft.get_peft_model(copy.deepcopy(base), peft.HRAConfig(r=8, target_modules=targets)),
                          backend=counting)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    start = time.perf_counter()
    for x, mask, y in DataLoader(data, batch_size=16):
        optimizer.zero_grad()
        F.cross_entropy(model(input_ids=x, attention_mask=mask).logits, y).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        for x, mask, _ in DataLoader(data, batch_size=24):
            model(input_ids=x, attention_mask=mask)
    return {"batches": "train 16×(6) + 4, eval 24×(4) + 4",
            "graphopt": {"traces": ours.traces, "compiles": ours.compiles, "seconds": round(graphopt_s, 1)},
            "peft_torch_compile": {"compiles": compiles, "seconds": round(time.perf_counter() - start, 1)}}
