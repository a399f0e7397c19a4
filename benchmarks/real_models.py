"""Benchmark case ``real-models``: graphopt on tiny random-init HF ``transformers`` models (no downloads).

Measured side by side in one call (the machine's load hits every variant alike; compare ratios):

1. ``setup_s``: for the tiny GPT-2 (``GPT2LMHeadModel``, 2 layers, hidden 64, vocab 256, ``use_cache=False``)
   and BERT (``BertForSequenceClassification``, same sizes): seconds to capture + rewrite
   (``graphopt.compile(..., example_inputs=...)`` with ``sora`` on the attention and MLP projections and
   ``adamw``) and of the first ``m.step`` (tracing the training step and compiling it).
2. ``ms_per_step``: one training step of GPT-2 (batch 8, seq 32; full: batch 16, seq 64) with each adapter
   (``hra``, ``oftv2``, ``sora``) on ``c_attn`` and ``c_fc``, through graphopt versus an eager PEFT-style
   baseline written here — each target module wrapped by a module computing the same adapter in plain
   PyTorch, trained with ``torch.optim.AdamW`` — and full fine-tuning of the eager model
   (``full_eager``). ``graphopt_vs_peft`` is graphopt's time over the PEFT-style time per adapter.

Baseline formulas (the same as the methods'): HRA (Yuan et al. 2024) weight-centric as PEFT does it,
``W′ = W H_1⋯H_r`` built by r rank-1 updates, ``H_i = I − 2ûᵢûᵢᵀ``; OFTv2 (Qiu et al. 2025) input-centric,
``x_j ← x_j R_j`` with ``R_j = (I+Q_j) Σ_{i<K} Q_j^i``; SoRA (Ding et al. 2023)
``y = base(x) + (α/r)((x Aᵀ) ⊙ g) Bᵀ`` with the proximal gate step ``g ← sign(g)·max(|g| − lr·ξ, 0)``.
"""

from __future__ import annotations

import copy
import fnmatch
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.bench import ratios, time_steps

VOCAB = 256
TARGETS = ("*.attn.c_attn", "*.mlp.c_fc")
ADAPTERS = ("hra", "oftv2", "sora")
R, BLOCK, NEUMANN, ALPHA, XI = 8, 16, 4, 16.0, 1e-3
LR = 1e-3


class Logits(nn.Module):
    """A ``transformers`` model whose forward returns the logits tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return Logits(GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                             use_cache=False, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                             embd_pdrop=0.0, attn_pdrop=0.0)))


def bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return Logits(BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=128, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)))


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


# -- eager PEFT-style adapters ----------------------------------------------------------------------------
class Adapted(nn.Module):
    """Wraps a ``Linear`` or transformers ``Conv1D`` (weight ``(in, out)``) with one adapter, frozen base."""

    def __init__(self, base: nn.Module, kind: str) -> None:
        super().__init__()
        conv1d = type(base).__name__ == "Conv1D"
        weight = base.weight.detach().t() if conv1d else base.weight.detach()  # (out, in)
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)
        self.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        self.kind = kind
        out_f, in_f = weight.shape
        if kind == "hra":  # columns in equal pairs: R = I at init
            half = torch.empty(in_f, R // 2).uniform_(-(2 / R) ** 0.5, (2 / R) ** 0.5)
            self.u = nn.Parameter(half.repeat_interleave(2, dim=1))
        elif kind == "oftv2":
            self.q = nn.Parameter(torch.zeros(in_f // BLOCK, BLOCK * (BLOCK - 1) // 2))
            self.register_buffer("rows", torch.triu_indices(BLOCK, BLOCK, 1), persistent=False)
        elif kind == "sora":
            self.a = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(R, in_f), a=5 ** 0.5))
            self.b = nn.Parameter(torch.zeros(out_f, R))
            self.gate = nn.Parameter(torch.ones(R))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "hra":
            weight = self.weight
            unit = self.u / self.u.norm(dim=0, keepdim=True)
            for i in range(unit.shape[1]):  # W ← W H_i, i = 1..r
                col = unit[:, i:i + 1]
                weight = weight - 2 * (weight @ col) @ col.t()
            return F.linear(x, weight, self.bias)
        if self.kind == "oftv2":
            nb = self.q.shape[0]
            m = x.new_zeros(nb, BLOCK, BLOCK)
            m[:, self.rows[0], self.rows[1]] = self.q
            q = m - m.transpose(1, 2)
            eye = torch.eye(BLOCK, dtype=x.dtype).expand(nb, BLOCK, BLOCK)
            series, power = eye, eye
            for _ in range(NEUMANN - 1):
                power = power @ q
                series = series + power
            rot = (eye + q) @ series
            xb = x.reshape(*x.shape[:-1], nb, BLOCK)
            x = torch.einsum("...ji,jik->...jk", xb, rot).reshape(x.shape)
            return F.linear(x, self.weight, self.bias)
        base = F.linear(x, self.weight, self.bias)
        return base + (ALPHA / R) * ((x @ self.a.t()) * self.gate) @ self.b.t()


def peft_style(model: nn.Module, kind: str) -> nn.Module:
    """A copy of ``model`` with every module matching ``TARGETS`` wrapped by :class:`Adapted`, others frozen."""
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for path, module in list(model.named_modules()):
        if any(fnmatch.fnmatchcase(path, t) for t in TARGETS):
            owner, _, name = path.rpartition(".")
            setattr(model.get_submodule(owner), name, Adapted(module, kind))
    return model


def eager_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str | None) -> Callable[[], torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    gates = [m.gate for m in model.modules() if isinstance(m, Adapted) and m.kind == "sora"]

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model(x), y)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for g in gates:  # SoRA's proximal step on the gate
                g.copy_(g.sign() * (g.abs() - LR * XI).clamp_min(0))
        return loss.detach()

    return step


def _spec(kind: str) -> str:
    targets = list(TARGETS)
    return {"hra": f"hra(r={R}, targets={targets!r})", "oftv2": f"oftv2(block_size={BLOCK}, targets={targets!r})",
            "sora": f"sora(r={R}, alpha={ALPHA}, sparse_lambda={XI}, targets={targets!r})"}[kind]


def _setup_times(build: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, loss_fn: Any,
                 targets: list[str], backend: str) -> dict[str, float]:
    model = build()
    start = time.perf_counter()
    m = graphopt.compile(model, methods=[f"sora(r={R}, targets={targets!r})", f"adamw(lr={LR})"], loss_fn=loss_fn,
                         example_inputs=(x,), backend=backend)
    captured = time.perf_counter()
    m.step(x, y)
    first = time.perf_counter()
    m.step(x, y)
    second = time.perf_counter()
    return {"capture_rewrite_s": round(captured - start, 2), "first_step_s": round(first - captured, 2),
            "second_step_s": round(second - first, 3)}


def bench_real_models(quick: bool) -> dict[str, Any]:
    """Case ``real-models``: see the module docstring."""
    batch, seq, steps = (8, 32, 10) if quick else (16, 64, 20)
    backend = "eager" if quick else "inductor"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    next_ids = torch.roll(ids, -1, dims=1)
    labels = torch.randint(0, 3, (batch,), generator=g)
    setup = {
        "gpt2": _setup_times(gpt2, ids, next_ids, lm_loss, list(TARGETS), backend),
        "bert": _setup_times(bert, ids, labels, F.cross_entropy,
                             ["*.attention.self.query", "*.attention.self.value", "*.intermediate.dense"], backend),
    }
    base = gpt2()
    full = copy.deepcopy(base)
    variants: dict[str, Callable[[], Any]] = {"full_eager": eager_step(full, ids, next_ids, None)}
    available = [a for a in ADAPTERS if a in graphopt.list_methods()]
    for kind in available:
        variants[f"{kind}_peft_eager"] = eager_step(peft_style(base, kind), ids, next_ids, kind)
        m = graphopt.compile(base, methods=[_spec(kind), f"adamw(lr={LR}, weight_decay=0.0)"], loss_fn=lm_loss,
                             example_inputs=(ids,), backend=backend)
        variants[f"{kind}_graphopt"] = lambda m=m: m.step(ids, next_ids)
    times = time_steps(variants, steps=steps, warmup=2, block=2 if quick else 5, progress=False)
    return {
        "shape": f"tiny GPT-2 (2 layers, hidden 64, vocab {VOCAB}), batch {batch}, seq {seq}, targets {list(TARGETS)}, "
                 f"AdamW lr={LR}, graphopt backend={backend!r}",
        "setup_s": setup,
        "ms_per_step": {k: round(v, 2) for k, v in times.items()},
        "vs_full_eager": ratios(times, "full_eager"),
        "graphopt_vs_peft": {k: round(times[f"{k}_graphopt"] / times[f"{k}_peft_eager"], 3) for k in available},
    }

