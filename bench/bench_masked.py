"""MaskedBatchNorm1d against torch's BatchNorm1d on the same padded batch (issue 24): training
forward+backward of one layer on (N, C, L) = (64, 128, 200) with 30% padding, eager and under
``torch.compile`` (default inductor), in torch's (N, C, L) layout and the (N, L, C) layout of
transformers. Target: bnlab / torch <= 1.0 in every row. Compiled rows also time, without a
target, the masked layer on its tensor ops (``use_backend("torch")``), which is what graphs
would get if they did not call bnlab's operator.

torch's BatchNorm1d normalises every position, padding included (what a model without a
masked layer runs); in the (N, L, C) layout it gets ``x.transpose(1, 2)`` and its output is
transposed back, as a transformer would call it. The masked layer gets the boolean mask.

One process, both contenders alternating call by call in every round; each figure is the
median over rounds of the per-round median, and the spread is the range of the per-round
ratios bnlab / torch. Rows are measured at each thread count of ``--threads`` (on a machine
shared with other work, 1 thread is the steadier figure: OpenMP teams of 2 wait on each other
whenever a core is taken). Dynamo's recompile limit is raised so that no compiled layer falls
back to eager silently, and every compiled layer must have compiled without a graph break.
Synthetic tensors: the figure is a layer's cost on a stated shape, not a model's.

    python bench/bench_masked.py [--rounds 30] [--repeats 5] [--threads 1,2] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402
import bnlab  # noqa: E402

SHAPE = (64, 128, 200)
PADDING = 0.30
TARGET = 1.0


def lengths_for(n: int, length: int, padding: float) -> torch.Tensor:
    """Lengths spread evenly (shuffled) so that the padded fraction is ``padding``: from
    ``length`` down to ``length (1 - 2 padding)``."""
    lo = length * (1 - 2 * padding)
    lengths = torch.linspace(length, lo, n).round().long()
    return lengths[torch.randperm(n, generator=torch.Generator().manual_seed(0))]


def contenders(layout: str, compiled: bool):
    n, c, length = SHAPE
    lengths = lengths_for(n, length, PADDING)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    g = torch.Generator().manual_seed(1)
    shape = (n, length, c) if layout == "nlc" else (n, c, length)
    x = torch.randn(shape, generator=g)
    x = torch.where((mask[:, :, None] if layout == "nlc" else mask[:, None, :]), x, 0.0)
    x.requires_grad_(True)
    gy = torch.randn(shape, generator=g)
    ours = bnlab.MaskedBatchNorm1d(c, layout=layout)
    ops = bnlab.MaskedBatchNorm1d(c, layout=layout)
    ref = nn.BatchNorm1d(c)

    def ref_call(t):
        return ref(t.transpose(1, 2)).transpose(1, 2) if layout == "nlc" else ref(t)

    def ours_call(t):
        return ours(t, mask=mask)

    def ops_call(t):
        return ops(t, mask=mask)

    if compiled:
        ref_call, ours_call = torch.compile(ref_call), torch.compile(ours_call)
        ops_call = torch.compile(ops_call)

    def step(fn, backend=None):
        def f():
            with bnlab.kernels.use_backend(backend) if backend else contextlib.nullcontext():
                fn(x).backward(gy)
            x.grad = None
        return f

    padded = 1.0 - float(mask.float().mean())
    fns = {"torch": step(ref_call), "bnlab": step(ours_call)}
    if compiled:  # the masked tensor ops under inductor: why graphs get the operator too
        fns["tensor_ops"] = step(ops_call, "torch")
    return fns, padded


def summarise(per_round: dict[str, list[float]]) -> dict:
    ratios = [b / t for b, t in zip(per_round["bnlab"], per_round["torch"], strict=True)]
    extra = {}
    if "tensor_ops" in per_round:
        ops = statistics.median(per_round["tensor_ops"])
        extra = {"tensor_ops_ms": ops * 1e3,
                 "tensor_ops_ratio": ops / statistics.median(per_round["torch"])}
    return {**extra,
        "torch_ms": statistics.median(per_round["torch"]) * 1e3,
        "bnlab_ms": statistics.median(per_round["bnlab"]) * 1e3,
        "ratio": statistics.median(per_round["bnlab"]) / statistics.median(per_round["torch"]),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--quick", action="store_true", help="3 rounds of 2: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.repeats = 3, 2
    warnings.filterwarnings("ignore")
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 512
    threads = [int(t) for t in args.threads.split(",")]
    before = torch.get_num_threads()
    rows = []
    try:
        for nt in threads:
            torch.set_num_threads(nt)
            for compiled in [False] if args.skip_compile else [False, True]:
                for layout in ("ncl", "nlc"):
                    torch._dynamo.reset()
                    torch._dynamo.utils.counters.clear()
                    fns, padded = contenders(layout, compiled)
                    r = summarise(_timing.rounds_of(fns, args.rounds, args.repeats))
                    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
                    if compiled and breaks:
                        raise RuntimeError(f"{layout}: {breaks} graph breaks in the compiled step")
                    mode = "compiled" if compiled else "eager"
                    rows.append({"layout": layout, "mode": mode, "threads": nt,
                                 "padded": round(padded, 4), "target": TARGET, **r})
                    print(f"{layout} {mode:8s} {nt} thread(s)  bnlab/torch {r['ratio']:.3f} "
                          f"[{r['ratio_min']:.3f}, {r['ratio_max']:.3f}]  ({r['bnlab_ms']:.2f} "
                          f"vs {r['torch_ms']:.2f} ms, target <= {TARGET})"
                          + (f"; masked tensor ops {r['tensor_ops_ratio']:.3f}"
                             if "tensor_ops_ratio" in r else ""), flush=True)
    finally:
        torch.set_num_threads(before)
    met = [r["ratio"] <= r["target"] for r in rows]
    print(f"shape {SHAPE}, padding {rows[0]['padded']:.3f}; targets met: {sum(met)} of {len(met)}")
    _timing.write_json("bench_masked" + ("_quick" if args.quick else ""), {
        "machine": _timing.machine(), "shape": list(SHAPE), "rounds": args.rounds,
        "repeats": args.repeats, "kernels": bnlab.kernels.backend(), "rows": rows,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
