"""Memory for backward, and time, of 8 Conv3x3-BN-activation blocks: eager, fused, in-place.

Claims checked (issue: in-place activated BN):

* ``bnlab.BatchNormAct2d(act="leaky_relu", inplace=True)`` keeps at most 0.40x the
  saved-for-backward bytes of eager ``Conv2d -> BatchNorm2d -> LeakyReLU`` blocks, and
* runs a forward+backward in at most 0.9x eager's time in the same run.

The run ends with both verdicts and the floor (the convolutions alone).

What is measured, per network (input ``(batch, channels, size, size)``, 8 blocks):

* saved bytes: the distinct storages handed to ``torch.autograd.graph.saved_tensors_hooks``
  during one forward pass, all of them and without parameters and buffers (activations). A
  convolution saves its input, which is the previous block's output: what a BN layer saves
  counts only where it is not that tensor, so the network-level ratio is the honest one;
* peak memory: growth of the peak resident set (``VmHWM``, reset through
  ``/proc/self/clear_refs``; Linux) over two forward+backward steps, above the resident set
  with the model and input built, each network in a fresh subprocess so the peaks do not mix
  (it includes what allocators keep between steps, so it is coarser than the saved bytes);
* time: median of interleaved forward+backward steps (``_timing.interleaved_medians``), as a
  ratio to eager in the same run.

Rows: eager Conv-BN-LeakyReLU; the same with ``LeakyReLU(inplace=True)``; the fused layer
(saves its input); the in-place layer (saves its output); and the ReLU networks (eager, eager
in-place ReLU, fused; ReLU cannot be inverted, so it has no in-place row); and the floor, the 8
convolutions alone (``convs_only``): no BN + activation layer, however fast, can bring the
time ratio below the floor's.

    python bench/bench_fused_memory.py [--batch 32] [--channels 64] [--size 32] [--rounds 5]
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

KINDS = {
    # name: (activation, how the BN + activation is built)
    "eager": ("leaky_relu", "eager"),
    "eager_inplace_act": ("leaky_relu", "eager_inplace_act"),
    "fused": ("leaky_relu", "fused"),
    "inplace": ("leaky_relu", "inplace"),
    "relu_eager": ("relu", "eager"),
    "relu_eager_inplace_act": ("relu", "eager_inplace_act"),
    "relu_fused": ("relu", "fused"),
    # the floor: the 8 convolutions alone, no BN, no activation. Any BN + activation layer
    # adds its time to this, so a time ratio below the floor's is out of reach for all of them
    "convs_only": ("none", "convs"),
}
TARGETS = {"saved_ratio": 0.40, "time_ratio": 0.9}  # the in-place row, against eager


def build(kind: str, channels: int, depth: int = 8, seed: int = 0) -> nn.Sequential:
    act, how = KINDS[kind]
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers.append(nn.Conv2d(channels, channels, 3, padding=1, bias=False))
        if how == "convs":
            continue
        if how in ("eager", "eager_inplace_act"):
            inplace = how == "eager_inplace_act"
            layers += [nn.BatchNorm2d(channels),
                       nn.LeakyReLU(0.01, inplace=inplace) if act == "leaky_relu"
                       else nn.ReLU(inplace=inplace)]  # fmt: skip
        else:
            layers.append(bnlab.BatchNormAct2d(channels, act=act, inplace=how == "inplace"))
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
    """Peak RSS over two steps, above the RSS with the model and input built: what the steps
    need, including what an allocator keeps between them (torch's, and the output-buffer
    cache of bnlab's kernels), so neither side is flattered by memory held from step one."""
    model = build(kind, channels)
    x = torch.randn(batch, channels, size, size)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak RSS (VmHWM)
    before = _rss_kib("VmRSS")
    for _ in range(2):
        model(x).square().mean().backward()
        model.zero_grad(set_to_none=True)
    print(json.dumps({"peak_growth_bytes": (_rss_kib("VmHWM") - before) * 1024}))


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _step(model: nn.Module, x: torch.Tensor):
    def run() -> None:
        model(x).square().mean().backward()
        model.zero_grad(set_to_none=True)

    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--repeats", type=int, default=3, help="steps per model per round")
    p.add_argument("--child", choices=sorted(KINDS), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=_timing.RESULTS / "bench_fused_memory.json")
    args = p.parse_args(argv)
    if args.child:
        peak_child(args.child, args.batch, args.channels, args.size)
        return 0
    x = torch.randn(args.batch, args.channels, args.size, args.size)
    models = {k: build(k, args.channels) for k in KINDS}
    rows: dict[str, dict] = {}
    for kind, model in models.items():
        total, acts = saved_bytes(model, x)
        out = subprocess.run(
            [sys.executable, __file__, "--child", kind, "--batch", str(args.batch),
             "--channels", str(args.channels), "--size", str(args.size)],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        peak = json.loads(out.strip().splitlines()[-1])["peak_growth_bytes"]
        rows[kind] = {"saved_bytes": total, "saved_activation_bytes": acts,
                      "peak_rss_growth_bytes": peak}  # fmt: skip
    # time: the LeakyReLU networks against eager, the ReLU ones against eager ReLU
    times = _timing.interleaved_medians(
        {k: _step(m, x) for k, m in models.items()}, rounds=args.rounds, repeats=args.repeats
    )
    for kind in KINDS:
        base = "relu_eager" if kind.startswith("relu") else "eager"
        r = rows[kind]
        r["step_seconds"] = times[kind]
        r["time_ratio"] = times[kind] / times[base]
        for key in ("saved_bytes", "saved_activation_bytes", "peak_rss_growth_bytes"):
            r[key.replace("_bytes", "_ratio")] = r[key] / rows[base][key]
    print(f"8 x Conv3x3-BN-act, input {tuple(x.shape)}, backend {bnlab.kernels.backend()}, "
          f"{torch.get_num_threads()} threads; ratios to the eager network of the same "
          "activation in this run")  # fmt: skip
    print(f"{'network':24} {'saved MiB':>9} {'ratio':>6} {'acts MiB':>9} {'ratio':>6} "
          f"{'peak MiB':>9} {'ratio':>6} {'step ms':>8} {'ratio':>6}")
    for kind, r in rows.items():
        print(f"{kind:24} {r['saved_bytes'] / 2**20:9.2f} {r['saved_ratio']:6.3f} "
              f"{r['saved_activation_bytes'] / 2**20:9.2f} {r['saved_activation_ratio']:6.3f} "
              f"{r['peak_rss_growth_bytes'] / 2**20:9.2f} {r['peak_rss_growth_ratio']:6.3f} "
              f"{r['step_seconds'] * 1e3:8.1f} {r['time_ratio']:6.3f}")  # fmt: skip
    payload = {
        "environment": {**_timing.machine(), "bnlab": bnlab.__version__,
                        "backend": bnlab.kernels.backend(), "machine": platform.machine()},
        "input_shape": list(x.shape),
        "rows": rows,
    }  # fmt: skip
    _timing.write_json(args.out, payload)
    inplace, floor = rows["inplace"], rows["convs_only"]["time_ratio"]
    for key, target in TARGETS.items():
        verdict = "met" if inplace[key] <= target else "NOT met"
        print(f"in-place {key}: {inplace[key]:.3f} (target <= {target}): {verdict}")
    print(f"floor: the convolutions alone take {floor:.3f} of eager's step time")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
