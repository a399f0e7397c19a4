"""SoRA's sparsifying scheduler on scikit-learn digits: accuracy against the number of active ranks.

A small MLP is pre-trained on the digits, then adapted with ``sora`` to a label-permuted variant of the
task while ξ (the L1 strength on the gates) rises from ``sparse_lambda`` to ``max_lambda``; every
``--every`` steps the script records ξ, the active ranks per layer and the test accuracy, prints a
table and plots accuracy against the total active rank (``out/sora_sparsify.png``). At the end the
model is pruned (outputs unchanged) and exported with the pruned factors to ``out/sora_pruned.onnx``.

    python examples/sora_sparsify.py [--steps 1500] [--schedule log-linear] [--backend eager]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import graphopt
from graphopt.builtin.sora import lambda_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--schedule", default="log-linear", choices=["linear", "log-linear", "exp"])
    parser.add_argument("--min-lambda", type=float, default=0.02)
    parser.add_argument("--max-lambda", type=float, default=3.0)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--backend", default="eager", choices=["eager", "inductor"])
    parser.add_argument("--out", default="out")
    args = parser.parse_args()

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, test_size=0.3, random_state=0, stratify=y)
    Xtr, Xte = torch.tensor(Xtr, dtype=torch.float32), torch.tensor(Xte, dtype=torch.float32)
    ytr, yte = torch.tensor(ytr), torch.tensor(yte)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(net(Xtr), ytr).backward()
        opt.step()
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    ytr, yte_new = perm[ytr], perm[yte]  # the task to adapt to: permuted labels
    with torch.no_grad():
        print(f"pre-trained: accuracy {(net(Xte).argmax(1) == yte).float().mean():.3f} on the original labels, "
              f"{(net(Xte).argmax(1) == yte_new).float().mean():.3f} on the permuted ones")

    spec = (f"sora(r={args.r}, alpha={2 * args.r}, sparse_lambda={args.min_lambda}, "
            f"lambda_schedule={args.schedule!r}, max_lambda={args.max_lambda}, lambda_steps={args.steps})")
    m = graphopt.compile(net, methods=[spec, f"sgd(lr={args.lr}, momentum=0.9)"], loss_fn=F.cross_entropy,
                         example_inputs=(Xtr[:128],), backend=args.backend)
    method = m.methods[0]
    gen, batch = torch.Generator().manual_seed(1), 128
    per_epoch = len(Xtr) // batch
    rows = []
    print(f"{'step':>6} {'ξ':>8} {'active ranks per layer':<26} {'total':>5} {'accuracy':>8}")
    for step in range(1, args.steps + 1):
        if (step - 1) % per_epoch == 0:
            order = torch.randperm(len(Xtr), generator=gen)
        idx = order[((step - 1) % per_epoch) * batch:((step - 1) % per_epoch + 1) * batch]
        m.step(Xtr[idx], ytr[idx])
        if step % args.every == 0 or step == args.steps:
            m.eval()
            with torch.no_grad():
                acc = (m(Xte).argmax(1) == yte_new).float().mean().item()
            m.train()
            ranks = m.sora_ranks()
            total = sum(a for a, _ in ranks.values())
            xi = lambda_at(step, method.sparse_lambda, method.lambda_schedule, method.max_lambda, method.lambda_steps)
            per_layer = ", ".join(f"{k}:{a}" for k, (a, _) in ranks.items())
            print(f"{step:>6} {xi:>8.4f} {per_layer:<26} {total:>5} {acc:>8.3f}")
            rows.append((step, xi, total, acc))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        before = m(Xte)
        m.prune()
        print(f"pruned to {m.sora_ranks()}; max |Δ output| = {(m(Xte) - before).abs().max():.2e}")
    print(graphopt.export(m.eval(), out / "sora_pruned.onnx", example_inputs=(Xte[:16],), merge=False))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    totals, accs = [r[2] for r in rows], [r[3] for r in rows]
    ax.plot(totals, accs, "o-")
    for _, xi, total, acc in rows[:: max(1, len(rows) // 6)]:
        ax.annotate(f"ξ={xi:.2g}", (total, acc), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(f"active ranks (sum over {len(m.sora_ranks())} layers, r={args.r} each)")
    ax.set_ylabel("test accuracy (permuted digits)")
    ax.set_title(f"SoRA sparsifying scheduler ({args.schedule} ξ: {args.min_lambda} → {args.max_lambda})")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "sora_sparsify.png", dpi=120)
    print(f"wrote {out / 'sora_sparsify.png'}")


if __name__ == "__main__":
    main()
