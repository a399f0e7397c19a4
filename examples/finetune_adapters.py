"""Fine-tune a pretrained MLP on a shifted task with orthogonal adapters (hra, oftv2) vs full fine-tuning.

1. Pretrain a small MLP on scikit-learn's ``load_digits`` (8×8 images, ships with scikit-learn).
2. Shift the task: the same digits mirrored left–right (same labels). The pretrained model does poorly.
3. Fine-tune a copy with each adapter method (``hra``, ``oftv2``: only the adapter parameters train, the
   base weights stay frozen) and with full fine-tuning, all through ``graphopt.compile(...).step``.
4. Plot the training-loss curves (``out/finetune_adapters.png``) and print test accuracies.
5. Export each adapter model with the adapter folded into the weights (``merge=True``) to ONNX and check
   the file with onnxruntime against the adapter model on the whole test set.

Run: ``python examples/finetune_adapters.py`` (about half a minute on CPU, eager backend).
Methods that are not registered in this installation are listed and skipped.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import graphopt

OUT = Path(__file__).resolve().parent.parent / "out"
ADAPTERS = {"hra": "hra(r=8)", "oftv2": "oftv2(block_size=16, neumann_terms=4)"}
BATCH, EPOCHS = 128, 12


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32)  # (n, 8, 8) in [0, 1]
    y = torch.tensor(digits.target)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return x_tr, x_te, y_tr, y_te


def flat(images: torch.Tensor) -> torch.Tensor:
    return (images.reshape(len(images), 64) - 0.3) / 0.4


def mirrored(images: torch.Tensor) -> torch.Tensor:
    return images.flip(-1)


def make_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10))


def batches(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x) - BATCH + 1, BATCH):  # full batches only: one graph shape
            idx = order[start:start + BATCH]
            yield x[idx], y[idx]


def accuracy(fn, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (fn(x).argmax(-1) == y).float().mean().item()


def pretrain(x: torch.Tensor, y: torch.Tensor) -> nn.Sequential:
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for xb, yb in batches(x, y, 20, seed=0):
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    return model


def optimizer_spec(lr: float) -> str:
    return f"adamw(lr={lr}, weight_decay=0.0)" if "adamw" in graphopt.list_methods() else f"sgd(lr={lr * 30})"


def finetune(pretrained: nn.Module, methods: list[str], x: torch.Tensor, y: torch.Tensor):
    model = graphopt.compile(copy.deepcopy(pretrained), methods=methods, loss_fn=F.cross_entropy,
                             example_inputs=(x[:BATCH],), backend="eager")
    losses = [model.step(xb, yb).item() for xb, yb in batches(x, y, EPOCHS, seed=1)]
    return model, losses


def check_onnx(model: graphopt.CompiledModel, name: str, x: torch.Tensor) -> float:
    import onnxruntime

    path = OUT / f"digits_{name}_merged.onnx"
    report = graphopt.export(model, path, example_inputs=(x[:8],), merge=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    model.eval()
    with torch.no_grad():
        expected = model(x).numpy()
    model.train()
    diff = float(np.abs(onnx_out - expected).max())
    scale = max(1.0, float(np.abs(expected).max()))
    assert diff <= 1e-5 * scale, f"{path}: onnxruntime differs from the adapter model by {diff} (logits up to {scale})"
    assert (onnx_out.argmax(-1) == expected.argmax(-1)).all()
    print(f"  {report}; onnxruntime vs adapter model on {len(x)} test images: max |Δ| = {diff:.2e} "
          f"(logits up to {scale:.1f}), same predictions")
    return diff


def main() -> None:
    start = time.perf_counter()
    torch.set_num_threads(1)  # a tiny MLP: one thread avoids threading overhead
    OUT.mkdir(exist_ok=True)
    x_tr, x_te, y_tr, y_te = load_data()
    pretrained = pretrain(flat(x_tr), y_tr)
    shifted_tr, shifted_te = flat(mirrored(x_tr)), flat(mirrored(x_te))
    print(f"pretrained: test accuracy {accuracy(pretrained, flat(x_te), y_te):.3f} on the original task, "
          f"{accuracy(pretrained, shifted_te, y_te):.3f} on the mirrored task")

    available = graphopt.list_methods()
    missing = [name for name in ADAPTERS if name not in available]
    if missing:
        print(f"not registered here, skipped: {', '.join(missing)} (registered methods: {', '.join(available)})")
    runs = {"full fine-tuning": [optimizer_spec(1e-3)]}
    runs.update({name: [spec, optimizer_spec(1e-2)] for name, spec in ADAPTERS.items() if name in available})

    curves: dict[str, list[float]] = {}
    for label, methods in runs.items():
        torch.manual_seed(0)
        model, losses = finetune(pretrained, methods, shifted_tr, y_tr)
        curves[label] = losses
        trainable = sum(p.numel() for p in model.trainable_parameters().values())
        model.eval()
        acc = accuracy(model, shifted_te, y_te)
        model.train()
        print(f"{label:>17} [{', '.join(methods)}]: {trainable} trainable parameters, "
              f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, mirrored test accuracy {acc:.3f}")
        if label in ADAPTERS:
            check_onnx(model, label, shifted_te)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, losses in curves.items():
        smooth = np.convolve(losses, np.ones(5) / 5, mode="valid")
        ax.plot(np.arange(len(smooth)) + 2, smooth, label=label)
    ax.set_xlabel("step (batch of 128)")
    ax.set_ylabel("training loss (5-step mean)")
    ax.set_yscale("log")
    ax.set_title("digits, mirrored: fine-tuning a pretrained MLP")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "finetune_adapters.png", dpi=120)
    print(f"wrote {OUT / 'finetune_adapters.png'} ({time.perf_counter() - start:.1f} s in all)")


if __name__ == "__main__":
    main()
