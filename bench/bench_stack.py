"""bnlab against torch's BN in the stack users run: compiled, on torch's kernels, under autocast.

One run, medians of alternating rounds, ratios bnlab / torch for a training step (forward,
backward, Adam step) of the small CNN on Fashion-MNIST batches of 128
(``bnlab.lab.models.small_cnn`` with norm ``bn`` against ``torch-bn``):

* ``compiled``: both models under ``torch.compile`` (inductor), default settings. Target
  <= 1.0: by default a compiled bnlab layer is torch's BN in the graph (see
  ``bnlab.kernels._dispatch``). Also reported: bnlab compiled under
  ``use_backend("native")``, with bnlab's operator in the graph (inductor cannot fuse it with
  the ReLU and pooling around it); and the floor, torch's BN with frozen statistics (eval-mode
  BN layers in a training step), which no BN that computes batch statistics can beat.
* ``torch kernels``: eager, ``bnlab.kernels.use_backend("torch")`` (= ``BNLAB_KERNELS=torch``),
  bnlab's policy over torch's own kernels. Target <= 1.1.
* ``autocast bf16``: eager under ``torch.autocast("cpu", dtype=torch.bfloat16)``, where the
  native kernels do not apply; ``BatchNorm2d`` and the fused ``BatchNormAct2d(relu)`` against
  torch's ``BatchNorm2d`` (+ ReLU). Target <= 1.1.
* ``compiled BN+ReLU``: reported, a single BN-heavy layer under ``torch.compile`` with bnlab's
  operator forced (``use_backend("native")``), where it has more to gain than the fusion
  inductor loses around it.
* ``per call``: one training forward of ``BatchNorm2d(4)`` on a (2, 4, 2, 2) tensor, bnlab
  against torch (reported: the fixed Python cost of a layer call).

    python bench/bench_stack.py [--rounds 5] [--repeats 10] [--skip-compile]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402
import bnlab  # noqa: E402
from bnlab.lab.data import load_dataset  # noqa: E402
from bnlab.lab.models import small_cnn  # noqa: E402

TARGETS = {"compiled": 1.0, "torch kernels": 1.1, "autocast bf16 BatchNorm2d": 1.1,
           "autocast bf16 BatchNormAct2d": 1.1}  # fmt: skip


def _step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: bool = False):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    return step


class _FusedSeed(nn.Module):
    """The small CNN with each BN + ReLU as one fused layer (norm before the activation)."""

    def __init__(self, fused: bool) -> None:
        super().__init__()

        def block(cin, cout):
            conv = nn.Conv2d(cin, cout, 3)
            if fused:
                return [conv, bnlab.BatchNormAct2d(cout, act="relu"), nn.MaxPool2d(2)]
            return [conv, nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

        self.net = nn.Sequential(*block(1, 32), *block(32, 64), nn.Flatten(),
                                 nn.Linear(1600, 10))  # fmt: skip

    def forward(self, x):
        return self.net(x)


def _pair(make, x, y, *, autocast=False, compile_=False):
    torch.manual_seed(0)
    models = {name: make(name) for name in ("bnlab", "torch")}
    if compile_:
        models = {k: torch.compile(m) for k, m in models.items()}
    return {k: _step_fn(m, x, y, autocast) for k, m in models.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--data-dir", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    # several compiled models share Sequential.forward: no silent fall-back to eager
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 512
    warnings.filterwarnings("ignore")
    data = load_dataset("fashion-mnist", args.data_dir)
    x, y = data.x_train[:128], data.y_train[:128]
    seed = {"bnlab": lambda _: small_cnn(norm="bn"), "torch": lambda _: small_cnn(norm="torch-bn")}

    def bnlab_or_torch(name):
        return seed[name](name)

    rows: dict[str, dict[str, float]] = {}

    def measure(label, fns, **kw):
        t = _timing.interleaved_medians(fns, rounds=args.rounds, repeats=args.repeats, **kw)
        rows[label] = {"bnlab_ms": t["bnlab"] * 1e3, "torch_ms": t["torch"] * 1e3,
                       "ratio": t["bnlab"] / t["torch"]}  # fmt: skip
        r = rows[label]
        r.update({f"{k}_ms": v * 1e3 for k, v in t.items() if k not in ("bnlab", "torch")})
        target = TARGETS.get(label)
        verdict = "" if target is None else (" met" if r["ratio"] <= target else " NOT met")
        print(f"{label:30s} bnlab {r['bnlab_ms']:8.3f} ms  torch {r['torch_ms']:8.3f} ms  "
              f"ratio {r['ratio']:.3f}" + ("" if target is None else f"  (<= {target}{verdict})"),
              flush=True)  # fmt: skip
        return r

    if not args.skip_compile:
        # A third contender, reported: bnlab compiled with its operator in the graph (traced and
        # called under use_backend("native")), which inductor cannot fuse with its neighbours
        fns = _pair(bnlab_or_torch, x, y, compile_=True)
        torch.manual_seed(0)
        on_native = _step_fn(torch.compile(small_cnn(norm="bn")), x, y)

        def on_native_op():
            with bnlab.kernels.use_backend("native"):
                on_native()

        fns["bnlab native op"] = on_native_op
        # The floor, reported: torch's BN with its statistics frozen (its layers in eval mode,
        # the rest training), so the batch moments and their backward cost nothing and only
        # the affine map is left, fused by inductor. No training BN can cost less than that.
        torch.manual_seed(0)
        frozen = small_cnn(norm="torch-bn")
        for m in frozen.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        fns["torch frozen statistics"] = _step_fn(torch.compile(frozen), x, y)
        r = measure("compiled", fns, warmup=3)
        r["native_op_ratio"] = r["bnlab native op_ms"] / r["torch_ms"]
        r["floor_ratio"] = r["torch frozen statistics_ms"] / r["torch_ms"]
        print(f"{'  compiled, native op':30s} bnlab {r['bnlab native op_ms']:8.3f} ms  "
              f"{'':20s}ratio {r['native_op_ratio']:.3f}  (reported)", flush=True)
        print(f"{'  floor: frozen statistics':30s} torch {r['torch frozen statistics_ms']:8.3f} ms"
              f"  {'':20s}ratio {r['floor_ratio']:.3f}  (reported: no BN computing batch "
              "statistics can go below it)", flush=True)
        # reported: one BN-heavy layer, where the fused native op has more to gain than the
        # fusion inductor loses around it
        big = torch.randn(64, 64, 56, 56, requires_grad=True)
        grad = torch.randn_like(big)

        def layer_step(name):
            bn = bnlab.BatchNorm2d(64) if name == "bnlab" else nn.BatchNorm2d(64)
            m = torch.compile(nn.Sequential(bn, nn.ReLU()))
            which = "native" if name == "bnlab" else "torch"

            def step():
                with bnlab.kernels.use_backend(which):
                    m(big).backward(grad)
                big.grad = None

            return step

        measure("compiled BN+ReLU (64,64,56,56)", {k: layer_step(k) for k in ("bnlab", "torch")},
                warmup=3)  # fmt: skip
    with bnlab.kernels.use_backend("torch"):
        measure("torch kernels", _pair(bnlab_or_torch, x, y))
    measure("eager (native)", _pair(bnlab_or_torch, x, y))
    measure("autocast bf16 BatchNorm2d", _pair(bnlab_or_torch, x, y, autocast=True))
    measure("autocast bf16 BatchNormAct2d",
            _pair(lambda name: _FusedSeed(name == "bnlab"), x, y, autocast=True))  # fmt: skip

    tiny = torch.randn(2, 4, 2, 2)
    layers = {"bnlab": bnlab.BatchNorm2d(4), "torch": nn.BatchNorm2d(4)}
    rows_tiny = {k: (lambda m=m: m(tiny)) for k, m in layers.items()}
    measure("per call (2,4,2,2) train fwd", rows_tiny)
    layers = {k: m.eval() for k, m in layers.items()}
    measure("per call (2,4,2,2) eval", rows_tiny)
    met = all(rows[k]["ratio"] <= t for k, t in TARGETS.items() if k in rows)
    print("targets:", "all met" if met else "NOT all met")
    _timing.write_json("bench_stack", {"machine": _timing.machine(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
