"""Saved-for-backward bytes and peak memory of 8 Conv-BN-ReLU blocks: fused vs eager.

Claim checked: ``bnlab.BatchNormAct2d`` saves at most half the bytes of eager
``torch.nn.BatchNorm2d`` + ``torch.relu`` for backward. The stack counts the convolutions'
saved tensors too: each convolution saves its input, which is the previous block's ReLU
output, the very tensor the fused layer avoids saving, so in a Conv-BN-ReLU stack the saving
shrinks to the last block's output (the ratio is printed, not assumed).

Saved bytes: distinct storages handed to ``torch.autograd.graph.saved_tensors_hooks`` during
one forward pass. Peak memory: growth of the peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs``; Linux) over one forward+backward, measured in a fresh subprocess
per model so that the peaks do not mix.

    python bench/bench_fused_memory.py [--batch 64] [--channels 32] [--size 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

import _timing
import bnlab


def build(kind: str, channels: int, depth: int = 8) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers.append(nn.Conv2d(channels, channels, 3, padding=1, bias=False))
        if kind == "fused":
            layers.append(bnlab.BatchNormAct2d(channels))
        else:
            layers += [nn.BatchNorm2d(channels), nn.ReLU()]
    return nn.Sequential(*layers)


def saved_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """``(all, activations)``; activations leave out parameters and buffers."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    return sum(seen.values()), sum(v for k, v in seen.items() if k not in own)


def peak_child(kind: str, batch: int, channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = build(kind, channels)
    x = torch.randn(batch, channels, size, size)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak RSS (VmHWM)
    before = _rss_kib("VmRSS")
    model(x).square().mean().backward()
    print(json.dumps({"peak_growth_bytes": (_rss_kib("VmHWM") - before) * 1024}))


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--child", choices=["eager", "fused"], help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=_timing.RESULTS / "bench_fused_memory.json")
    args = p.parse_args(argv)
    if args.child:
        peak_child(args.child, args.batch, args.channels, args.size)
        return 0
    x = torch.randn(args.batch, args.channels, args.size, args.size, requires_grad=True)
    rows = {}
    for kind in ("eager", "fused"):
        model = build(kind, args.channels)
        total, acts = saved_bytes(model, x)
        bn_total, bn_acts = saved_bytes(
            model[1] if kind == "fused" else nn.Sequential(model[1], model[2]), x
        )
        out = subprocess.run(
            [sys.executable, __file__, "--child", kind, "--batch", str(args.batch),
             "--channels", str(args.channels), "--size", str(args.size)],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        peak = json.loads(out.strip().splitlines()[-1])["peak_growth_bytes"]
        rows[kind] = {
            "stack_saved_bytes": total,
            "stack_saved_activation_bytes": acts,
            "one_bn_act_saved_bytes": bn_total,
            "one_bn_act_saved_activation_bytes": bn_acts,
            "peak_rss_growth_bytes": peak,
        }
    e, f = rows["eager"], rows["fused"]
    print(f"8 x Conv-BN-ReLU, input {tuple(x.shape)}, backend {bnlab.kernels.backend()}")
    print(f"{'':36} {'eager MiB':>10} {'fused MiB':>10} {'ratio':>7}")
    for key in (
        "one_bn_act_saved_bytes", "one_bn_act_saved_activation_bytes", "stack_saved_bytes",
        "stack_saved_activation_bytes", "peak_rss_growth_bytes",
    ):  # fmt: skip
        print(f"{key:36} {e[key] / 2**20:10.2f} {f[key] / 2**20:10.2f} {f[key] / e[key]:7.3f}")
    payload = {
        "environment": {"torch": torch.__version__, "bnlab": bnlab.__version__,
                        "backend": bnlab.kernels.backend(), "machine": platform.machine()},
        "input_shape": list(x.shape),
        "rows": rows,
        "ratios": {k: f[k] / e[k] for k in e},
    }  # fmt: skip
    _timing.write_json(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
