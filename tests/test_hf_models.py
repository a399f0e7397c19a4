"""Stock Hugging Face models as users train them: default configs with dropout on, keyword inputs, the models'
own ``ModelOutput``s and losses, train/eval fidelity, export, and ``transformers.Trainer``."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from models import (
    NUM_LABELS,
    VOCAB,
    TorchvisionStyleResNet,
    default_bert,
    default_gpt2,
    default_llama,
    default_vit,
    image_batch,
)

import graphopt

pytest.importorskip("transformers")


def tokens(batch: int = 4, seq: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -2:] = 0  # one padded row
    return ids, mask


def logits_of(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


CASES = {
    "bert": (default_bert, lambda: dict(zip(("input_ids", "attention_mask"), tokens())), "hra(r=4, targets='*.query')"),
    "gpt2": (default_gpt2, lambda: {"input_ids": tokens()[0]}, "sora(r=4, targets='*.c_attn')"),
    "vit": (default_vit, lambda: {"pixel_values": image_batch(4)[0]}, "hra(r=4, targets='*.q_proj')"),
    "llama": (default_llama, lambda: {"input_ids": tokens()[0]}, "oftv2(block_size=16, targets='*.q_proj')"),
    "resnet": (TorchvisionStyleResNet, lambda: {"x": image_batch(4)[0]}, "hra(r=4, targets='fc')"),
}


# Llama, ViT and the ResNet also run in the zoo matrix: slow here (the default suite keeps BERT and GPT-2)
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("llama", "vit", "resnet") else n
                                  for n in CASES])
def test_eval_equals_the_models_own_eval_mode_and_exports(name: str, tmp_path) -> None:
    build, inputs, adapter = CASES[name]
    model = build()
    batch = inputs()
    m = graphopt.compile(model, methods=[adapter, "adamw(lr=1e-2)"], example_inputs=batch, backend="eager",
                         loss_fn=lambda out, y: F.cross_entropy(logits_of(out).flatten(0, -2), y.flatten()))
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        expected = logits_of(reference(**batch))
        m.eval()
        torch.testing.assert_close(logits_of(m(**batch)), expected, rtol=0, atol=1e-5)  # twice: no dropout
        torch.testing.assert_close(logits_of(m(**batch)), expected, rtol=0, atol=1e-5)
        m.train()
        first, second = logits_of(m(**batch)), logits_of(m(**batch))
    assert not torch.equal(first, second)  # training mode: dropout is on
    m.eval()
    with torch.no_grad():
        expected = logits_of(m(**batch))  # after training-mode calls (batch-norm statistics moved)
    for merge in (True, False):
        report = graphopt.export(m, tmp_path / f"{name}_{merge}.onnx", merge=merge)
        session = onnxruntime.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
        feeds = {arg.name: batch[arg.name].numpy() for arg in session.get_inputs()}
        out = session.run(None, feeds)
        logits = next(o for o in out if o.shape == tuple(expected.shape))
        np.testing.assert_allclose(logits, expected.numpy(), rtol=0, atol=1e-4)


def test_keyword_inputs_model_outputs_and_labels_as_the_target() -> None:
    model = default_bert()
    ids, mask = tokens()
    labels = torch.tensor([0, 1, 2, 1])
    seen = []

    def loss_fn(output, target):
        seen.append(type(output).__name__)
        return F.cross_entropy(output.logits, target)

    m = graphopt.compile(model, methods=["adamw(lr=1e-3)"], loss_fn=loss_fn, backend="eager")
    loss = m.step(input_ids=ids, attention_mask=mask, labels=labels)  # labels is the target of loss_fn
    assert seen[-1] == "SequenceClassifierOutput" and torch.isfinite(loss)
    out = m(input_ids=ids, attention_mask=mask)
    assert type(out).__name__ == "SequenceClassifierOutput" and out.logits.shape == (4, NUM_LABELS)
    with pytest.raises(graphopt.InputError, match=r"captured for inputs \(input_ids=int64\[\*, \*\], "
                                                  r"attention_mask=int64\[\*, \*\]\).*this call passes \(int64"):
        m(ids)
    m.eval()(input_ids=ids[:3, :5], attention_mask=mask[:3, :5])  # other batch and sequence sizes: dynamic


def test_the_models_own_loss_equals_eager_hf_and_adamw() -> None:
    """No loss_fn: labels go to the model, which computes its own loss; fused steps equal HF + torch.optim.AdamW,
    dropout on (the eager model runs on the same generator state, so it draws the same masks)."""
    model = default_bert().double()
    reference = copy.deepcopy(model)
    ids, mask = tokens()
    labels = torch.tensor([0, 1, 2, 1])
    m = graphopt.compile(model, methods=["adamw(lr=1e-2)"], backend="eager",
                         example_inputs={"input_ids": ids, "attention_mask": mask, "labels": labels})
    torch.set_rng_state(m.state_dict()["_graphopt.rng.cpu"])
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    for step in range(3):
        loss = m.step(input_ids=ids, attention_mask=mask, labels=labels)
        optimizer.zero_grad()
        expected = reference(input_ids=ids, attention_mask=mask, labels=labels).loss
        expected.backward()
        optimizer.step()
        assert loss.item() == pytest.approx(expected.item(), abs=1e-12), step
    ours = dict(m.named_parameters())
    for name, param in reference.named_parameters():
        torch.testing.assert_close(ours[name], param, rtol=0, atol=1e-12, msg=name)


def test_transformers_trainer_trains_the_adapters_with_its_own_optimizer(tmp_path) -> None:
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Tokens(Dataset):
        def __len__(self) -> int:
            return 21  # batches of 8: a ragged last batch of 5

        def __getitem__(self, i: int) -> dict:
            g = torch.Generator().manual_seed(i)
            ids = torch.randint(0, VOCAB, (8,), generator=g)
            return {"input_ids": ids, "attention_mask": torch.ones(8, dtype=torch.long), "labels": ids[0] % 3}

    model = default_bert()
    example = {k: torch.stack([Tokens()[i][k] for i in range(8)]) for k in ("input_ids", "attention_mask", "labels")}
    m = graphopt.compile(model, methods=["hra(r=4, targets=['*.query', '*.value'])"], example_inputs=example)
    adapters = {n: p.detach().clone() for n, p in m.trainable_parameters().items()}
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=3,
                             learning_rate=5e-3, logging_steps=1, report_to=[], save_strategy="no",
                             label_names=["labels"], use_cpu=True)
    trainer = Trainer(model=m, args=args, train_dataset=Tokens())
    result = trainer.train()
    assert result.global_step == 9 and np.isfinite(result.training_loss)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 9
    after = dict(m.named_parameters())
    assert all(not torch.equal(after[n], v) for n, v in adapters.items())  # every adapter moved
    assert all(torch.equal(after[n], v) for n, v in frozen.items())  # the base stayed frozen
    assert m.compile_stats().compiles <= 2  # the ragged last batch compiled nothing new (train + eval graphs)
