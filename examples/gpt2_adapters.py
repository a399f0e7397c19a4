"""A tiny random-init HF GPT-2 with an adapter: a few training steps, then ONNX export with the adapter folded.

1. Build ``GPT2LMHeadModel`` from a tiny config (2 layers, hidden 64, vocab 256; no download) and wrap it so
   its forward returns the logits tensor. ``use_cache=False``: a ``DynamicCache`` output does not export.
2. ``graphopt.compile`` with ``sora`` (or the adapter named on the command line: hra, oftv2, sora) on the
   attention ``c_attn`` and MLP ``c_fc`` projections — transformers' ``Conv1D`` layers, which appear in the
   captured graph as ``aten.addmm`` with the weight stored ``(in, out)`` — and ``adamw``. The token ids'
   batch *and* sequence dims are dynamic (``dynamic_dims=[(0, 1)]``).
3. Train a few steps on a counting task (the next token is the current one plus one).
4. Export to ONNX with ``merge=True``: the file holds a plain GPT-2 with the base model's parameter count.
   ``graphopt.export`` checks it with onnxruntime on the example shape and on a grown one; this script
   checks it again on two new shapes against the PyTorch model (≤ 1e-4).

Run: ``python examples/gpt2_adapters.py [hra|oftv2|sora]`` (needs ``transformers``; ~1 min on CPU).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import graphopt

VOCAB, SEQ, BATCH, STEPS = 256, 16, 8, 30
SPECS = {"hra": "hra(r=4, targets={t!r})", "oftv2": "oftv2(block_size=16, targets={t!r})",
         "sora": "sora(r=4, targets={t!r})"}
TARGETS = ["*.attn.c_attn", "*.mlp.c_fc"]


class Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).logits


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def counting_batch(seed: int, batch: int = BATCH, seq: int = SEQ) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.randint(0, VOCAB, (batch, 1), generator=torch.Generator().manual_seed(seed))
    ids = (start + torch.arange(seq)) % VOCAB
    return ids, (ids + 1) % VOCAB


def main(adapter: str = "sora") -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, use_cache=False,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = Logits(GPT2LMHeadModel(config))
    base_params = sum(p.numel() for p in model.parameters())
    ids, target = counting_batch(0)
    m = graphopt.compile(model, methods=[SPECS[adapter].format(t=TARGETS), "adamw(lr=1e-2, weight_decay=0.0)"],
                         loss_fn=lm_loss, example_inputs=(ids,), backend="eager", dynamic_dims=[(0, 1)])
    trainable = sum(p.numel() for p in m.trainable_parameters().values())
    print(f"captured by {m.graph_module.meta['graphopt_capture']}; {adapter}: {trainable} trainable parameters "
          f"(base model: {base_params}, frozen)")
    for step in range(1, STEPS + 1):
        ids, target = counting_batch(step)
        loss = m.step(ids, target)
        if step == 1 or step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}")

    import onnxruntime

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gpt2.onnx"
        report = graphopt.export(m, path, merge=True)
        print(report, "checked on input shapes", report.checked_shapes)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        m.eval()
        for batch, seq in ((1, 7), (3, 20)):
            ids, _ = counting_batch(100 + seq, batch, seq)
            with torch.no_grad():
                expected = m(ids)
            (actual,) = session.run(None, {name: ids.numpy()})
            diff = (torch.from_numpy(actual) - expected).abs().max().item()
            print(f"onnxruntime vs PyTorch on ids {tuple(ids.shape)}: max |Δ| = {diff:.2e}")
            assert diff <= 1e-4, diff
    folded = graphopt.export(m, Path(tempfile.gettempdir()) / "gpt2_folded.py", merge=True)
    count = int(folded.path.read_text().split("# parameters: ")[1].split()[0])
    print(f"folded model parameters: {count} (base model: {base_params})")
    assert count == base_params


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "sora")
