"""``bnlab demo``: the main job of ``make demo``.

Until the seed experiment lands this trains a small BN network on synthetic data to show the
layers at work; the seed experiment replaces it.
"""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    import torch

    import bnlab

    torch.manual_seed(0)
    x = torch.randn(512, 1, 12, 12)
    labels = (x.mean(dim=(1, 2, 3)) > 0).long()
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3), bnlab.BatchNorm2d(8, running="window", window_size=5),
        torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 10 * 10, 2),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(60):
        idx = torch.randint(0, 512, (64,))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            print(f"step {step:3d} loss {loss.item():.4f}")
    model.eval()
    acc = (model(x).argmax(1) == labels).float().mean().item()
    print(f"eval accuracy with window running statistics: {acc:.3f}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main demonstration (make demo)")
    p.set_defaults(func=_run)
