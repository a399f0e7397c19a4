"""Data-parallel training launched with torchrun: scikit-learn's digits, one shard of every batch per process.

    torchrun --nproc_per_node 2 examples/ddp_train.py                          # DDP semantics (sharding none)
    torchrun --nproc_per_node 2 examples/ddp_train.py --sharding grad_op       # ZeRO-2
    torchrun --nproc_per_node 2 examples/ddp_train.py --sharding full --optimizer "dion(lr=0.02, rank=16)"

torchrun starts one process per ``--nproc_per_node`` and sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT;
``init_process_group("gloo")`` reads them (CPU; "nccl" with one GPU per process). Each process trains on its part
of every global batch (``DistributedSampler``), and graphopt averages the gradients inside the compiled step, so
the run takes the steps one process would take on the global batches. Every process must make the same calls:
``m.step``, and with ``sharding="full"`` also the forward (``m(x)``) and ``m.state_dict()``, which gather.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import graphopt


def main() -> None:
    parser = argparse.ArgumentParser(description="graphopt data-parallel training on digits (run with torchrun)")
    parser.add_argument("--sharding", default="none", choices=["none", "grad_op", "full"])
    parser.add_argument("--optimizer", default="adamw(lr=3e-3)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64, help="global batch (split over the processes)")
    parser.add_argument("--backend", default="inductor", choices=["inductor", "eager", "aot_eager"])
    parser.add_argument("--save", default=None, help="write the (unsharded) checkpoint here at the end")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = TensorDataset(x[order[:1437]], y[order[:1437]]), (x[order[1437:]], y[order[1437:]])
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(train, batch_size=args.batch // world, sampler=sampler, drop_last=True)

    torch.manual_seed(rank)  # a different init per process: graphopt starts every rank from rank 0's weights
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))
    m = graphopt.compile(model, methods=[args.optimizer], loss_fn=F.cross_entropy, backend=args.backend,
                         process_group=dist.group.WORLD, sharding=args.sharding)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        total, batches = torch.zeros(()), 0
        for xb, yb in loader:
            total += m.step(xb, yb)  # this rank's loss; the update used the gradient averaged over the ranks
            batches += 1
        dist.all_reduce(total)  # the global mean loss, for the log
        with torch.no_grad():
            accuracy = (m.eval()(test[0]).argmax(1) == test[1]).float().mean().item()
        m.train()
        if rank == 0:
            print(f"epoch {epoch + 1}: train loss {total.item() / (batches * world):.4f}, test accuracy {accuracy:.3f}"
                  f" ({world} processes, sharding={args.sharding!r}, {args.optimizer})", flush=True)
    state = m.state_dict()  # unsharded: loads on any number of processes, or in one
    if args.save and rank == 0:
        torch.save(state, args.save)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
