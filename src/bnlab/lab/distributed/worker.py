"""A small self-contained DDP training entry: ``python -m bnlab.lab.distributed.worker``.

Start it with torchrun (``bnlab.lab.distributed.launch(2, args=[...])``). It trains a small CNN
on a seeded synthetic image task (4 classes of 1x8x8 patterns in noise), each step drawing one
global batch of ``world_size * batch_size`` samples that the ranks split, then averages the
running statistics over the ranks (:func:`sync_running_stats`), evaluates on a held-out set
and writes, under ``--out``: ``summary.json`` and ``checkpoint.pt`` (rank 0) and
``rank{R}.pt`` (each rank's parameters and buffers, for checks).

If another rank crashes or stops answering, the collective fails within ``--timeout``
seconds and this rank prints ``bnlab.lab.distributed.worker: rank R stopped ...`` and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from bnlab.norms import make_norm, norm_names

from .runtime import init_from_env, run_rank, sync_running_stats, wrap_ddp

__all__ = ["small_cnn", "synthetic_task", "main"]


def small_cnn(norm: str, classes: int = 4) -> nn.Module:
    """conv-norm-relu x2, global average pooling and a linear head."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), make_norm(norm, 8, 2), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), make_norm(norm, 16, 2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes),
    )


def synthetic_task(n: int, seed: int, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noisy 1x8x8 images of ``classes`` fixed random patterns, and their labels."""
    g = torch.Generator().manual_seed(1234)
    patterns = torch.randn(classes, 1, 8, 8, generator=g)
    g.manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = 3.0 + patterns[y] + 1.5 * torch.randn(n, 1, 8, 8, generator=g)
    return x, y


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bnlab.lab.distributed.worker", description=__doc__)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--norm", default="bn", choices=norm_names())
    p.add_argument("--sync-bn", action="store_true", help="convert BN layers to SyncBatchNorm")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16, help="samples per rank per step")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=60.0, help="collective timeout (seconds)")
    p.add_argument("--step-delay", type=float, default=0.0, help="sleep after each step (tests)")
    return p.parse_args(argv)


def _train(args: argparse.Namespace) -> None:
    info = init_from_env(timeout_s=args.timeout)
    r, world = info.rank, info.world_size
    print(f"rank {r} pid {os.getpid()} world {world} backend {info.backend}", flush=True)
    torch.manual_seed(args.seed)
    model = small_cnn(args.norm)
    ddp = wrap_ddp(model, info, sync_bn=args.sync_bn)
    net = ddp.module
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    x_train, y_train = synthetic_task(4096, seed=args.seed + 1)
    x_val, y_val = synthetic_task(1024, seed=args.seed + 2)
    g = torch.Generator().manual_seed(args.seed)
    gb = world * args.batch_size
    loss = torch.tensor(float("nan"))
    for step in range(args.steps):
        idx = torch.randint(0, len(x_train), (gb,), generator=g)[r * args.batch_size :][
            : args.batch_size
        ]
        xb, yb = x_train[idx].to(info.device), y_train[idx].to(info.device)
        ddp.train()
        loss = nn.functional.cross_entropy(ddp(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        print(f"rank {r} step {step} loss {loss.item():.4f}", flush=True)
        if args.step_delay:
            time.sleep(args.step_delay)
    sync_running_stats(net)
    net.eval()
    with torch.no_grad():
        acc = (net(x_val.to(info.device)).argmax(1).cpu() == y_val).float().mean().item()
    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    torch.save(state, args.out / f"rank{r}.pt")
    if info.is_main:
        torch.save(state, args.out / "checkpoint.pt")
        summary = {
            "world_size": world, "backend": info.backend, "norm": args.norm,
            "sync_bn": args.sync_bn, "steps": args.steps, "batch_size_per_rank": args.batch_size,
            "final_train_loss": float(loss.item()), "val_accuracy": acc,
        }
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    return run_rank("bnlab.lab.distributed.worker", lambda: _train(args),
                    "\n(another rank crashed or stopped answering, or this rank failed)")

if __name__ == "__main__":
    sys.exit(main())
