"""What a small BN layer costs inside a network, taken apart: Ioffe's MLP (784-100-100-100-10,
BatchNorm1d + sigmoid, batch 60) forward, one thread, with its three BN layers replaced by
modules that do less and less of bnlab's work.

Counted alone, in a loop, one bnlab layer call executes as many instructions as torch's
(``bench_instructions.py``). Between matrix products, every Python frame and operator call
costs several times what it costs in a tight loop (its code and objects are no longer in
cache), so the length of the path matters more than its instruction count. The rows, each
relative to the torch model in the same interleaved run:

* ``torch.batch_norm`` - torch's operator with its in-kernel running update, no module Python;
* ``native_batch_norm`` - the kernel bnlab's step uses, without running statistics;
* ``+ running_update_`` - that kernel and bnlab's guarded update operator: bnlab's two
  operators with no Python around them;
* ``+ add_`` - the kernel and one ``num_batches_tracked.add_(1)``: what any one more
  operator call costs here;
* ``aten.step`` / ``train_step`` / ``layer._step`` - the same through bnlab's backend step, the
  backend choice, and the layer's step method;
* ``bnlab layer`` - the whole ``bnlab.BatchNorm1d`` forward (input checks included).

    python bench/bench_layer_context.py [--rounds 201] [--repeats 10]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402
import bnlab  # noqa: E402
from bnlab.kernels import _ops, backends  # noqa: E402
from bnlab.kernels.backends import aten  # noqa: E402
from bnlab.lab.models import ioffe_mlp  # noqa: E402


class _Part(nn.Module):
    """One BN layer's training forward with only part of bnlab's path (see the module text)."""

    def __init__(self, bn: nn.Module, mode: str):
        super().__init__()
        self.bn, self.mode = bn, mode

    def forward(self, x):
        b, mode = self.bn, self.mode
        if mode == "torch.batch_norm":
            return torch.batch_norm(x, b.weight, b.bias, b.running_mean, b.running_var, True,
                                    b.momentum, b.eps, False)  # fmt: skip
        if mode == "layer._step":
            return b._step(x)
        if mode == "train_step":
            return backends.train_step(x, b.weight, b.bias, b.running_mean, b.running_var,
                                       b.num_batches_tracked, b.momentum, b.eps)[0]  # fmt: skip
        if mode == "aten.step":
            return aten.step(x, b.weight, b.bias, b.running_mean, b.running_var,
                             b.num_batches_tracked, b.momentum, b.eps, "identity", 0.0,
                             False)[0]  # fmt: skip
        y, mean, invstd = torch.native_batch_norm(x, b.weight, b.bias, None, None, True, 0.0,
                                                  b.eps)  # fmt: skip
        if mode == "+ running_update_":
            n = x.shape[0]
            _ops._RUNNING(b.running_mean, b.running_var, b.num_batches_tracked, mean, invstd,
                          b.momentum, n / (n - 1), b.eps)  # fmt: skip
        elif mode == "+ add_":
            b.num_batches_tracked.add_(1)
        return y


def _with(model: nn.Sequential, mode: str) -> nn.Sequential:
    model = copy.deepcopy(model)
    for i, layer in enumerate(model):
        if isinstance(layer, nn.BatchNorm1d):
            model[i] = _Part(bnlab.convert(layer) if mode == "layer._step" else layer, mode)
    return model


MODES = ("torch.batch_norm", "native_batch_norm", "+ running_update_", "+ add_", "aten.step",
         "train_step", "layer._step")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=201)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    if not bnlab.kernels.native_available():
        print("the native operators are not built: nothing to take apart")
        return 0
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = ioffe_mlp(norm="torch-bn")
    x = torch.randn(60, 784)
    models = {"torch": copy.deepcopy(base), **{m: _with(base, m) for m in MODES},
              "bnlab layer": bnlab.convert(copy.deepcopy(base)),
              "torch again": copy.deepcopy(base)}  # fmt: skip

    def forward(m):
        return lambda: m(x)

    per_round = _timing.rounds_of({k: forward(m) for k, m in models.items()}, args.rounds,
                                  args.repeats)  # fmt: skip
    t = statistics.median(per_round["torch"])
    ratios = {k: statistics.median(v) / t for k, v in per_round.items()}
    print(f"Ioffe MLP forward, batch 60, 1 thread: torch {t * 1e6:.1f} us")
    for k, r in ratios.items():
        print(f"  {k:22s} {r:.3f}")
    _timing.write_json("bench_layer_context", {
        "machine": _timing.machine(), "rounds": args.rounds, "repeats": args.repeats,
        "torch_us": t * 1e6, "ratios": ratios,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
