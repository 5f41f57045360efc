"""Corruption benchmark on Fashion-MNIST: source model vs AdaBN vs TENT, severities 1-5.

Claim tested: re-estimating BN statistics on shifted test data (AdaBN) and adapting the BN
affine parameters by entropy minimisation (TENT) recover accuracy lost to input corruptions,
as Schneider et al. 2020 and Wang et al. 2021 report for CIFAR-10-C and ImageNet-C.

Protocol: train the seed CNN (Conv-ReLU-BN-MaxPool x2, Linear) on Fashion-MNIST's training
set; for each corruption and severity, corrupt the test set (seeded), and measure

* ``source``: the trained model in evaluation mode (training-set running statistics);
* ``adabn``: a copy whose BN statistics are the exact statistics of the corrupted test set;
* ``tent``: a fresh TENT wrapper (Adam, lr 1e-3, one step per batch) passed once over the
  shuffled corrupted test set; accuracy of its online predictions.

Results go to ``OUT/shift.json``, ``OUT/shift.md`` and ``OUT/shift.png``.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .adapt import Tent, adapt
from .corruptions import CORRUPTIONS, corrupt

__all__ = ["ShiftConfig", "load_fashion_mnist", "run", "seed_cnn", "format_table", "main"]

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


def _read_idx(path: Path) -> np.ndarray:
    """Read a (gzip) IDX file into a uint8 array. Validates the magic number and the size."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} values for shape {dims}, "
                         f"got {body.size}")
    return body.reshape(dims)


def load_fashion_mnist(split: str, root: Path | str = FASHION_ROOT) -> tuple[Tensor, Tensor]:
    """``(images (N, 1, 28, 28) float32 in [0, 1], labels (N,) int64)`` for ``train``/``test``."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"load_fashion_mnist: split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    x = torch.from_numpy(images.copy()).float().div_(255).unsqueeze(1)
    return x, torch.from_numpy(labels.copy()).long()


def seed_cnn(bn_after_relu: bool = True) -> nn.Sequential:
    """The seed's CNN: Conv(1,32,3) ReLU BN MaxPool Conv(32,64,3) ReLU BN MaxPool Linear(1600,10).

    ``bn_after_relu=False`` puts each BN between the convolution and its ReLU instead.
    """
    def block(cin: int, cout: int) -> list[nn.Module]:
        conv, bn, act = nn.Conv2d(cin, cout, 3), nn.BatchNorm2d(cout), nn.ReLU()
        return [conv, act, bn, nn.MaxPool2d(2)] if bn_after_relu else [conv, bn, act,
                                                                       nn.MaxPool2d(2)]

    return nn.Sequential(*block(1, 32), *block(32, 64), nn.Flatten(), nn.Linear(1600, 10))


@dataclass(frozen=True)
class ShiftConfig:
    train_size: int = 60000
    test_size: int = 10000
    epochs: int = 2
    batch_size: int = 128
    lr: float = 1e-3
    tent_lr: float = 1e-3
    seed: int = 0
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    corruptions: tuple[str, ...] = tuple(CORRUPTIONS)


def _batches(x: Tensor, size: int) -> list[Tensor]:
    return list(x.split(size))


def train_source(x: Tensor, y: Tensor, cfg: ShiftConfig) -> nn.Module:
    torch.manual_seed(cfg.seed)
    model = seed_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=g)
        for idx in order.split(cfg.batch_size):
            if len(idx) < 2:
                continue
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500) -> float:
    correct = sum(int((model(xb).argmax(1) == yb).sum())
                  for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True))
    return correct / len(x)


def _tent_accuracy(source: nn.Module, x: Tensor, y: Tensor, cfg: ShiftConfig) -> float:
    tent = Tent(copy.deepcopy(source), lambda p: torch.optim.Adam(p, lr=cfg.tent_lr))
    correct = 0
    for xb, yb in zip(x.split(cfg.batch_size), y.split(cfg.batch_size), strict=True):
        correct += int((tent(xb).argmax(1) == yb).sum())
    return correct / len(x)


def evaluate_all(source: nn.Module, x: Tensor, y: Tensor, cfg: ShiftConfig) -> dict[str, float]:
    adabn = adapt(source, _batches(x, cfg.batch_size), "adabn")
    return {
        "source": accuracy(source, x, y),
        "adabn": accuracy(adabn, x, y),
        "tent": _tent_accuracy(source, x, y, cfg),
    }


def run(cfg: ShiftConfig, root: Path | str = FASHION_ROOT, log=print) -> dict:
    """Train the source model and measure every corruption and severity; returns the results."""
    t0 = time.perf_counter()
    xtr, ytr = load_fashion_mnist("train", root)
    xte, yte = load_fashion_mnist("test", root)
    g = torch.Generator().manual_seed(cfg.seed)
    tr = torch.randperm(len(xtr), generator=g)[: cfg.train_size]
    te = torch.randperm(len(xte), generator=g)[: cfg.test_size]  # also TENT's stream order
    source = train_source(xtr[tr], ytr[tr], cfg)
    log(f"trained source model in {time.perf_counter() - t0:.0f} s")
    xte, yte = xte[te], yte[te]
    rows = [{"corruption": "clean", "severity": 0, **evaluate_all(source, xte, yte, cfg)}]
    for name in cfg.corruptions:
        for s in cfg.severities:
            xc = corrupt(xte, name, s, seed=cfg.seed + s)
            rows.append({"corruption": name, "severity": s, **evaluate_all(source, xc, yte, cfg)})
            r = rows[-1]
            log(f"{name:15s} {s}  source {r['source']:.4f}  adabn {r['adabn']:.4f}  "
                f"tent {r['tent']:.4f}")
    shifted = [r for r in rows if r["severity"] > 0]
    mean = {k: float(np.mean([r[k] for r in shifted])) for k in ("source", "adabn", "tent")}
    return {"config": asdict(cfg), "rows": rows, "mean_over_corruptions": mean,
            "seconds": time.perf_counter() - t0, "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def format_table(result: dict) -> str:
    """A markdown table of accuracies, one row per corruption and severity, plus the mean."""
    lines = ["| corruption | severity | source | AdaBN | TENT |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['corruption']} | {r['severity']} | {r['source']:.4f} | "
                     f"{r['adabn']:.4f} | {r['tent']:.4f} |")
    m = result["mean_over_corruptions"]
    lines.append(f"| **mean (corrupted)** | 1-5 | {m['source']:.4f} | {m['adabn']:.4f} | "
                 f"{m['tent']:.4f} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["corruption"] for r in result["rows"] if r["severity"] > 0))
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), sharey=True,
                             squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        rows = [r for r in result["rows"] if r["corruption"] == name]
        sev = [r["severity"] for r in rows]
        for key, label in (("source", "source"), ("adabn", "AdaBN"), ("tent", "TENT")):
            ax.plot(sev, [r[key] for r in rows], marker="o", label=label)
        ax.set_title(name)
        ax.set_xlabel("severity")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/shift"))
    p.add_argument("--root", type=Path, default=FASHION_ROOT)
    for f in ("train_size", "test_size", "epochs", "batch_size", "seed"):
        p.add_argument("--" + f.replace("_", "-"), type=int, default=getattr(ShiftConfig, f))
    p.add_argument("--tent-lr", type=float, default=ShiftConfig.tent_lr)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (1 is fastest on a busy 2-core machine)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ShiftConfig(train_size=args.train_size, test_size=args.test_size, epochs=args.epochs,
                      batch_size=args.batch_size, seed=args.seed, tent_lr=args.tent_lr)
    result = run(cfg, args.root, log=lambda *a: print(*a, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shift.json").write_text(json.dumps(result, indent=2))
    table = format_table(result)
    (args.out / "shift.md").write_text(table + "\n")
    plot(result, args.out / "shift.png")
    print(table)
    print(f"wrote {args.out}/shift.json, shift.md, shift.png")
    return 0
