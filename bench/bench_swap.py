"""What a user gets by swapping torch's BN for bnlab's (``bnlab.convert(model)``), eager and under
``torch.compile`` with default settings: whole SGD training steps of real networks on real
batches, and the cost of one layer call.

One process, both contenders alternating call by call in every round; each figure is the
median over rounds of the per-round median, and the spread is the range of the per-round
ratios bnlab / torch. A third contender, an identical copy of the torch model, gives each
row's noise floor (torch / torch). Targets: every training-step ratio <= 1.0 (eager conv nets
<= 0.9), one call's training forward+backward <= 1.3x torch's.

Networks (torch's BN in each, converted by ``bnlab.convert``):

* the small CNN (``bnlab.lab.models.small_cnn``), Fashion-MNIST, batch 128;
* a CIFAR-style ResNet, 3 stages of width 32/64/128 (``small_resnet``), Fashion-MNIST, 64;
* Ioffe's MLP 784-100-100-100-10, BatchNorm1d + sigmoid, Fashion-MNIST, batch 60;
* an MLP of width 1024 with BatchNorm1d, Fashion-MNIST, batch 256;
* a 1-D CNN with 3 BatchNorm1d on (128, C, 40) MNIST-1D sequences.

Dynamo's recompile limit is raised so that no compiled model falls back to eager silently, and
each compiled model is checked to have compiled (one frame, no graph break is not required:
the models are plain ``Sequential``s).

A row whose steps are quick gets more rounds than ``--rounds``: at least ``--min-seconds`` of
timed steps (the Ioffe MLP's 1 ms step gets a few hundred rounds, where 21 left its per-round
ratios spread over 0.9-1.2).

    python bench/bench_swap.py [--rounds 15] [--repeats 5] [--min-seconds 20] [--skip-compile]
        [--quick]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as TF
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402
import bnlab  # noqa: E402
from bnlab.lab.data import load_dataset  # noqa: E402
from bnlab.lab.models import ioffe_mlp, small_cnn, small_resnet  # noqa: E402

TARGET_STEP, TARGET_EAGER_CONV, TARGET_CALL = 1.0, 0.9, 1.3


def wide_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.BatchNorm1d(1024), nn.ReLU(),
                         nn.Linear(1024, 1024), nn.BatchNorm1d(1024), nn.ReLU(),
                         nn.Linear(1024, 10))  # fmt: skip


def cnn1d() -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(1, 32, 5, padding=2), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Conv1d(32, 64, 3, padding=1), nn.BatchNorm1d(64), nn.ReLU(),
                         nn.Conv1d(64, 64, 3, padding=1), nn.BatchNorm1d(64), nn.ReLU(),
                         nn.Flatten(), nn.Linear(64 * 40, 10))  # fmt: skip


def networks(data_dir):
    fashion = load_dataset("fashion-mnist", data_dir)
    seq = load_dataset("mnist1d")

    def batch(d, n, seq_shape=False):
        x, y = d.x_train[:n], d.y_train[:n]
        return (x.reshape(n, 1, -1) if seq_shape else x), y

    return [
        ("small CNN (128)", lambda: small_cnn(norm="torch-bn"), batch(fashion, 128), True),
        ("ResNet 32/64/128 (64)", lambda: small_resnet(norm="torch-bn", widths=(32, 64, 128)),
         batch(fashion, 64), True),
        ("Ioffe MLP, BatchNorm1d (60)", lambda: ioffe_mlp(norm="torch-bn"), batch(fashion, 60),
         False),
        ("MLP 1024, BatchNorm1d (256)", wide_mlp, batch(fashion, 256), False),
        ("1-D CNN, BatchNorm1d (128, C, 40)", cnn1d, batch(seq, 128, True), True),
    ]


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        TF.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def rounds_for(fns: dict, args) -> int:
    """``--rounds``, or more where a row's rounds are quick: at least ``--min-seconds`` of
    timed steps per row, so a 1 ms step gets as many samples as its noise needs (warms the
    contenders up, which compiles the compiled ones)."""
    for f in fns.values():
        f()
    t0 = time.perf_counter()
    for f in fns.values():
        f()
    per_round = (time.perf_counter() - t0) * args.repeats
    return max(args.rounds, min(args.max_rounds, math.ceil(args.min_seconds / per_round)))


def summarise(per_round: dict[str, list[float]]) -> dict:
    ratios = [b / t for b, t in zip(per_round["bnlab"], per_round["torch"], strict=True)]
    out = {}
    if "torch again" in per_round:
        # the noise floor: a second, identical torch model timed beside the first
        same = [b / t for b, t in zip(per_round["torch again"], per_round["torch"], strict=True)]
        out = {"torch_again_ratio": statistics.median(per_round["torch again"])
               / statistics.median(per_round["torch"]),
               "torch_again_min": min(same), "torch_again_max": max(same)}
    return out | {
        "torch_ms": statistics.median(per_round["torch"]) * 1e3,
        "bnlab_ms": statistics.median(per_round["bnlab"]) * 1e3,
        "ratio": statistics.median(per_round["bnlab"]) / statistics.median(per_round["torch"]),
        "ratio_min": min(ratios),
        "rounds": len(ratios),
        "ratio_max": max(ratios),
    }


def one_call(shape, rounds: int) -> dict:
    """Training forward+backward of one layer, 200 calls a sample, one thread."""
    c = shape[1]
    torch_cls = nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d
    mods = {"torch": torch_cls(c), "bnlab": bnlab.convert(torch_cls(c))}
    x = torch.randn(shape, requires_grad=True)
    g = torch.randn(shape)

    def call(m):
        def f():
            for _ in range(200):
                m(x).backward(g)
            x.grad = None
        return f

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        per_round = _timing.rounds_of({k: call(m) for k, m in mods.items()}, rounds, 1)
    finally:
        torch.set_num_threads(threads)
    out = summarise(per_round)
    out["torch_us"], out["bnlab_us"] = out.pop("torch_ms") * 5, out.pop("bnlab_ms") * 5
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-seconds", type=float, default=20.0,
                   help="timed seconds per row at least (more rounds for quick steps)")
    p.add_argument("--max-rounds", type=int, default=401)
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--quick", action="store_true", help="3 rounds of 2: a smoke run")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.repeats, args.min_seconds = 3, 2, 0.0
    warnings.filterwarnings("ignore")
    # every compiled model (two per network, each a Sequential.forward of its own) must stay
    # compiled: raise the limits so none falls back to eager silently
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 512
    torch.manual_seed(0)
    rows = []
    for name, make, (x, y), conv in networks(args.data_dir):
        base = make()
        # "torch again" is an identical copy of the torch model: its ratio is the bench's own
        # noise floor, printed beside bnlab's so a parity reading is not taken for a gap
        models = {"torch": copy.deepcopy(base), "bnlab": bnlab.convert(copy.deepcopy(base)),
                  "torch again": copy.deepcopy(base)}
        modes = [("eager", lambda m: m)]
        if not args.skip_compile:
            modes.append(("compiled", torch.compile))
        for mode, wrap in modes:
            fns = {k: step_fn(wrap(copy.deepcopy(m)), x, y) for k, m in models.items()}
            r = summarise(_timing.rounds_of(fns, rounds_for(fns, args), args.repeats))
            target = TARGET_EAGER_CONV if (mode == "eager" and conv) else TARGET_STEP
            rows.append({"network": name, "mode": mode, "target": target, **r})
            print(f"{name:36s} {mode:9s} bnlab/torch {r['ratio']:.3f} "
                  f"[{r['ratio_min']:.3f}, {r['ratio_max']:.3f}]  "
                  f"({r['bnlab_ms']:.2f} vs {r['torch_ms']:.2f} ms, target <= {target}); "
                  f"torch/torch {r['torch_again_ratio']:.3f} [{r['torch_again_min']:.3f}, "
                  f"{r['torch_again_max']:.3f}], {r['rounds']} rounds",
                  flush=True)  # fmt: skip
    calls = []
    for shape in ((2, 4, 2, 2), (60, 100)):
        r = one_call(shape, args.rounds)
        calls.append({"shape": list(shape), "target": TARGET_CALL, **r})
        print(f"one call fwd+bwd {str(shape):16s} bnlab/torch {r['ratio']:.3f} "
              f"[{r['ratio_min']:.3f}, {r['ratio_max']:.3f}]  ({r['bnlab_us']:.1f} vs "
              f"{r['torch_us']:.1f} us, 1 thread, target <= {TARGET_CALL})", flush=True)
    met = [r["ratio"] <= r["target"] for r in rows + calls]
    print(f"targets met: {sum(met)} of {len(met)}")
    _timing.write_json("bench_swap" + ("_quick" if args.quick else ""), {
        "machine": _timing.machine(), "rounds": args.rounds, "repeats": args.repeats,
        "kernels": bnlab.kernels.backend(), "steps": rows, "calls": calls,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
