"""Benchmark bnlab's native BN kernels against torch.nn.BatchNorm2d, in one run.

Claim checked: bnlab's training forward+backward takes at most 0.33x torch's time on NCHW and
at most 1.0x on channels-last; its evaluation forward at most 1.0x. Each kernel's effective
bandwidth is compared with a ``copy_`` of the same tensor (the memory floor).

Method: both layers see the same input; the torch and bnlab timings of one configuration are
interleaved repeat by repeat so that machine noise hits both; medians over ``--repeats``.
Prints a table and writes ``bench/results/bench_kernels_<allocator>.json`` (with the
environment).

Allocator: every BN step allocates fresh outputs (y, dx) as large as the input, 51 MB for the
two large shapes. With glibc's default settings such blocks are mmap'd and returned to the
kernel on free, so each step page-faults all its output pages afresh; on the virtual machines
this was measured on, those faults cost several times the arithmetic (torch's evaluation
forward on (64, 64, 56, 56): 14.7 ms with glibc's defaults, 4.5 ms with freed blocks kept, 2
cores) and dominate both libraries' timings alike, hiding the kernels. ``--allocator both``
(the default) therefore runs the benchmark twice, in two child processes: ``default`` (glibc
as it comes, what a user gets) and ``tuned`` (``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` at 4 GiB, so freed blocks are reused without new faults, what a
training loop that keeps its memory sees).
``--allocator default|tuned`` runs one (re-executing itself with the environment set).

    python bench/bench_kernels.py [--repeats 30] [--threads 2] [--dtype float32]
                                  [--allocator both|default|tuned]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

import _timing
import bnlab
from bnlab.kernels import _ops

SHAPES = [(128, 32, 26, 26), (128, 64, 11, 11), (64, 64, 56, 56), (256, 256, 14, 14)]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
# glibc tunables: keep freed blocks (no munmap / trim), so fresh outputs reuse faulted pages
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}


def _env_for(allocator: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TUNED_MALLOC}
    if allocator == "tuned":
        env.update(TUNED_MALLOC)
    return env


def _ensure_allocator(allocator: str, argv: list[str]) -> None:
    """Re-execute this script when the allocator environment differs from the requested one
    (glibc reads it at start-up only)."""
    want = {k: _env_for(allocator).get(k) for k in TUNED_MALLOC}
    if all(os.environ.get(k) == v for k, v in want.items()):
        return
    os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv],
              _env_for(allocator))  # fmt: skip


def _run_both(argv: list[str], out: Path) -> int:
    """Run the benchmark once per allocator setting in child processes; print both summaries."""
    summaries = {}
    for allocator in ("default", "tuned"):
        print(f"\n=== allocator: {allocator} ===", flush=True)
        child_out = out.with_name(f"{out.stem}_{allocator}{out.suffix}")
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--allocator", allocator,
               "--out", str(child_out)]  # fmt: skip
        rc = subprocess.run(cmd, env=_env_for(allocator), check=False).returncode
        if rc != 0:
            return rc
        summaries[allocator] = json.loads(child_out.read_text())["summary"]
    print("\nworst ratios (bnlab / torch), both allocator settings:")
    for allocator, summary in summaries.items():
        for layout, sm in summary.items():
            print(f"  {allocator:>7} {layout:>13}: training {sm['train_ratio_max']:.3f}, "
                  f"eval {sm['eval_ratio_max']:.3f}")  # fmt: skip
    return 0


def _interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable, the callables taking turns call by call."""
    return _timing.interleaved_medians(fns, rounds=repeats, repeats=1, warmup=3)


def _train_step(bn: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor):
    def step() -> None:
        bn(x).backward(dy)
        # Each step frees its own gradients. Clearing them at the start instead would charge
        # each library for freeing the other's x.grad (the contenders alternate on one x):
        # for the 51 MB shapes, unmapping torch's freshly faulted dx cost several ms.
        x.grad = None
        bn.zero_grad(set_to_none=True)

    return step


def bench_config(shape, layout: str, dtype: torch.dtype, repeats: int) -> dict:
    fmt = LAYOUTS[layout]
    c = shape[1]
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    dy = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
    ref = torch.nn.BatchNorm2d(c, dtype=dtype)
    ours = bnlab.BatchNorm2d(c, dtype=dtype)
    if not bnlab.kernels.supports(x.detach(), ours.weight, ours.bias):
        raise RuntimeError(f"native kernels do not support {shape} {layout}")
    xd = x.detach()
    out = torch.empty_like(xd)
    w, b = ours.weight.detach(), ours.bias.detach()
    _, mean, var, saved_invstd, delta, _ = _ops.native_train_forward(xd, w, b, 1e-5,
                                                                     "identity", 0.0)
    invstd = torch.rsqrt(var + 1e-5)

    train = _interleaved(
        {"torch": _train_step(ref, x, dy), "bnlab": _train_step(ours, x, dy)}, repeats
    )
    ref.eval()
    ours.eval()
    with torch.no_grad():
        evals = _interleaved({"torch": lambda: ref(xd), "bnlab": lambda: ours(xd)}, repeats)
    kernels = _interleaved(
        {
            "copy": lambda: out.copy_(xd),
            "clone": lambda: xd.clone(),  # copy into a fresh tensor, as the kernels write
            "train_fwd": lambda: _ops.native_train_forward(xd, w, b, 1e-5, "identity", 0.0),
            "eval_fwd": lambda: _ops.native_eval_forward(xd, mean, invstd, w, b, "identity", 0.0),
            "backward": lambda: _ops.native_backward_train(
                dy, xd, mean, saved_invstd, delta, None, w, None, None, None, 1e-5, "identity",
                0.0, True,
            ),
        },
        repeats,
    )
    nbytes = xd.numel() * xd.element_size()
    # bytes each kernel must move at least: copy and forwards read x and write y; the
    # backward reads dy and x and writes dx. Kernels allocate their outputs (fresh pages);
    # `clone` pays the same allocation, `copy` writes into an existing tensor.
    moved = {"copy": 2, "clone": 2, "train_fwd": 2, "eval_fwd": 2, "backward": 3}
    return {
        "shape": list(shape),
        "layout": layout,
        "train_fwd_bwd_s": train,
        "train_ratio": train["bnlab"] / train["torch"],
        "eval_fwd_s": evals,
        "eval_ratio": evals["bnlab"] / evals["torch"],
        "kernel_s": kernels,
        "kernel_over_copy": {k: kernels[k] / kernels["copy"] for k in moved},
        "kernel_over_clone": {k: kernels[k] / kernels["clone"] for k in moved},
        "kernel_gbps": {k: moved[k] * nbytes / kernels[k] / 1e9 for k in moved},
    }


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "bnlab": bnlab.__version__,
        "threads": torch.get_num_threads(),
        "backend": bnlab.kernels.backend(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.uname().processor,
        "python": platform.python_version(),
    }


def _strip_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """``argv`` without the given options (as ``--name value`` or ``--name=value``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in names:
            skip = True
        elif not a.startswith(tuple(n + "=" for n in names)):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--out", type=Path, default=_timing.RESULTS / "bench_kernels.json")
    p.add_argument("--allocator", choices=["both", "default", "tuned"], default="both",
                   help="glibc malloc settings to run under (see the module docstring)")
    raw = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(raw)
    if args.allocator == "both":
        rest = _strip_options(raw, ("--allocator", "--out"))
        return _run_both(rest, args.out)
    _ensure_allocator(args.allocator, raw)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = []
    head = (
        f"{'shape':>18} {'layout':>13} | {'train fwd+bwd ms':>22} {'ratio':>6} | "
        f"{'eval ms':>17} {'ratio':>6} | {'x copy_ (fwd, eval, bwd)':>25} | "
        f"{'x clone (fwd, eval, bwd)':>25} | GB/s copy"
    )
    print(f"allocator: {args.allocator}, threads: {args.threads}, dtype: {args.dtype}")
    print(head)
    print("-" * len(head))
    for shape in SHAPES:
        for layout in LAYOUTS:
            r = bench_config(shape, layout, dtype, args.repeats)
            rows.append(r)
            t, e, k = r["train_fwd_bwd_s"], r["eval_fwd_s"], r["kernel_over_copy"]
            kc = r["kernel_over_clone"]
            print(
                f"{str(tuple(shape)):>18} {layout:>13} | "
                f"{t['torch'] * 1e3:9.2f} -> {t['bnlab'] * 1e3:9.2f} {r['train_ratio']:6.3f} | "
                f"{e['torch'] * 1e3:7.2f} -> {e['bnlab'] * 1e3:6.2f} {r['eval_ratio']:6.3f} | "
                f"{k['train_fwd']:7.2f} {k['eval_fwd']:7.2f} {k['backward']:7.2f}   | "
                f"{kc['train_fwd']:7.2f} {kc['eval_fwd']:7.2f} {kc['backward']:7.2f}   | "
                f"{r['kernel_gbps']['copy']:6.1f}",
                flush=True,
            )
    summary = {
        layout: {
            "train_ratio_max": max(r["train_ratio"] for r in rows if r["layout"] == layout),
            "eval_ratio_max": max(r["eval_ratio"] for r in rows if r["layout"] == layout),
        }
        for layout in LAYOUTS
    }
    targets = {"nchw": 0.33, "channels_last": 1.0}
    for layout, s in summary.items():
        ok = s["train_ratio_max"] <= targets[layout] and s["eval_ratio_max"] <= 1.0
        print(
            f"{layout}: worst training ratio {s['train_ratio_max']:.3f} (target <= "
            f"{targets[layout]}), worst eval ratio {s['eval_ratio_max']:.3f} (target <= 1.0): "
            f"{'met' if ok else 'NOT met'}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "environment": environment(),
        "allocator": args.allocator,
        "malloc_env": {k: os.environ.get(k) for k in TUNED_MALLOC},
        "repeats": args.repeats,
        "dtype": args.dtype,
        "rows": rows,
        "summary": summary,
    }
    _timing.write_json(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
