"""Which implementation a bnlab layer should run inside ``torch.compile``: torch's decomposed BN
(what ``auto`` picks in graphs) or bnlab's operators (``bnlab::train_forward`` in the graph,
forced with ``use_backend("native")``), measured on whole compiled SGD training steps.

Single compiled layers train faster on the operators (about 0.6-0.9x torch's on the shapes of
the small CNN, the ResNet and 1-D CNNs), but a network is more than its BN layers: inductor
fuses torch's decomposed BN with the ReLU, pooling and residual adds around it, and the
kernels it generates for those neighbours are slower when they read a materialised BN output
than when the normalisation is fused in. This bench shows both sides, so the choice ``auto``
makes in graphs rests on a measurement that can be repeated:

* whole networks: the bench_swap 1-D CNN, the same with ``MaxPool1d`` after each block, a
  1-D residual CNN (MNIST-1D, batch 128), the small CNN and the ResNet (Fashion-MNIST);
* the neighbour effect alone: ``max_pool1d(relu(y))`` on a (128, 64, 40) input against
  ``max_pool1d(relu(batch_norm(x)))``, both compiled, forward and backward.

Contenders in one process, call by call within each round; figures are medians over rounds
of per-round medians, relative to torch's model; "torch again" is the noise floor.

    python bench/bench_graph_choice.py [--rounds 11] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402
import bench_swap  # noqa: E402
import bnlab  # noqa: E402
from bnlab.lab.data import load_dataset  # noqa: E402


class _Residual1d(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(c, c, 3, padding=1), nn.BatchNorm1d(c)
        self.conv2, self.bn2 = nn.Conv1d(c, c, 3, padding=1), nn.BatchNorm1d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def cnn1d_pool() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(1, 64, 5, padding=2), nn.BatchNorm1d(64), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(64, 128, 3, padding=1), nn.BatchNorm1d(128), nn.ReLU(), nn.MaxPool1d(2),
        nn.Flatten(), nn.Linear(128 * 10, 10),
    )  # fmt: skip


def cnn1d_residual() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(1, 64, 5, padding=2), nn.BatchNorm1d(64), nn.ReLU(),
        _Residual1d(64), _Residual1d(64), nn.Flatten(), nn.Linear(64 * 40, 10),
    )  # fmt: skip


def networks(data_dir):
    swap = {name: (make, xy) for name, make, xy, _ in bench_swap.networks(data_dir)}
    seq = load_dataset("mnist1d")
    x, y = seq.x_train[:128].reshape(128, 1, -1), seq.y_train[:128]
    picked = [n for n in swap if n.startswith(("1-D CNN", "small CNN", "ResNet"))]
    return [(n, *swap[n]) for n in picked] + [
        ("1-D CNN + MaxPool1d (128)", cnn1d_pool, (x, y)),
        ("1-D residual CNN (128)", cnn1d_residual, (x, y)),
    ]


def _native(step):
    def run():
        with bnlab.kernels.use_backend("native"):
            step()
    return run


def neighbour_effect(rounds: int, repeats: int) -> dict:
    """Compiled ``max_pool1d(relu(.))`` fed a plain tensor or fused behind torch's BN."""
    x = torch.randn(128, 64, 40, requires_grad=True)
    g = torch.randn(128, 64, 20)
    bn = nn.BatchNorm1d(64)
    alone = torch.compile(lambda t: nn.functional.max_pool1d(torch.relu(t), 2))
    fused = torch.compile(lambda t: nn.functional.max_pool1d(torch.relu(bn(t)), 2))

    def run(f):
        def call():
            f(x).backward(g)
            x.grad = None
        return call

    r = _timing.rounds_of({"pool(relu(y))": run(alone), "pool(relu(bn(x)))": run(fused)},
                          rounds, repeats)  # fmt: skip
    return {k: statistics.median(v) * 1e6 for k, v in r.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 512
    torch.manual_seed(0)
    rows = []
    for name, make, (x, y) in networks(args.data_dir):
        base = make()
        fns = {
            "torch": bench_swap.step_fn(torch.compile(copy.deepcopy(base)), x, y),
            "bnlab auto": bench_swap.step_fn(torch.compile(bnlab.convert(copy.deepcopy(base))),
                                             x, y),
            "bnlab native": _native(bench_swap.step_fn(
                torch.compile(bnlab.convert(copy.deepcopy(base))), x, y)),
            "torch again": bench_swap.step_fn(torch.compile(copy.deepcopy(base)), x, y),
        }  # fmt: skip
        per_round = _timing.rounds_of(fns, args.rounds, args.repeats)
        t = statistics.median(per_round["torch"])
        ratios = {k: statistics.median(v) / t for k, v in per_round.items() if k != "torch"}
        rows.append({"network": name, "torch_ms": t * 1e3, **ratios})
        print(f"{name:36s} torch {t * 1e3:7.2f} ms  " + "  ".join(
            f"{k}/torch {v:.3f}" for k, v in ratios.items()), flush=True)  # fmt: skip
    effect = neighbour_effect(args.rounds, args.repeats)
    print("compiled fwd+bwd on (128, 64, 40): " + ", ".join(
        f"{k} {v:.0f} us" for k, v in effect.items()))  # fmt: skip
    _timing.write_json("bench_graph_choice", {
        "machine": _timing.machine(), "rounds": args.rounds, "repeats": args.repeats,
        "networks": rows, "neighbour_effect_us": effect,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
