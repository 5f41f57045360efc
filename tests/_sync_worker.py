"""One rank of the SyncBatchNorm equivalence checks (run by tests/test_sync_multiprocess.py).

Usage: python _sync_worker.py RANK WORLD INIT_FILE OUT_DIR
Every case builds the same global batch on every rank from a seed, takes this rank's slice
(sizes differ between ranks and include zero), and saves outputs, gradients and running
statistics for the test to compare with single-process BN on the whole batch.
"""

from __future__ import annotations

import datetime
import sys

import torch
import torch.distributed as dist
from torch import nn

import bnlab

# Per-rank batch sizes by world size: unequal, with zero, and with a rank holding one value.
SIZES = {
    "bn2d": {2: [5, 3], 3: [4, 0, 6]},
    "act": {2: [0, 6], 3: [3, 2, 5]},
    "bn1d": {2: [1, 6], 3: [1, 0, 3]},
    "tiny": {2: [1, 0], 3: [0, 1, 0]},
    "fused": {2: [4, 3], 3: [2, 0, 5]},
    "window": {2: [3, 5], 3: [2, 4, 1]},
    "inplace": {2: [3, 4], 3: [2, 0, 5]},
}
SHAPES = {"bn2d": (3, 4, 4), "act": (3, 3, 2), "bn1d": (4,), "tiny": (4,), "fused": (3, 3, 3),
          "window": (3, 2, 2), "inplace": (3, 3, 3)}  # fmt: skip
STEPS = 3


class BNReLU2d(bnlab.BatchNorm2d):
    """A fused BN + activation, as a user (or bnlab.BatchNormAct2d) would write it."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def make_layer(case: str) -> nn.Module:
    if case == "bn2d":
        return nn.BatchNorm2d(3, momentum=0.3)
    if case == "act":
        return BNReLU2d(3)
    if case == "fused":  # bnlab's own fused layer: synchronised statistics, then its activation
        return bnlab.BatchNormAct2d(3, act="leaky_relu", negative_slope=0.2)
    if case == "window":
        return bnlab.BatchNorm2d(3, running="window", window_size=2)
    if case == "inplace":  # in-place activated BN: saves its output, overwrites its input
        layer = bnlab.BatchNormAct2d(3, act="leaky_relu", negative_slope=0.2, inplace=True)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([1.5, -0.7, 0.9]))
            layer.bias.copy_(torch.tensor([0.1, -0.3, 0.2]))
        return layer
    return bnlab.BatchNorm1d(4, affine=False, momentum=None)


def batch(case: str, world: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global input (with a large common offset) and upstream gradient of one step."""
    n = sum(SIZES[case][world])
    g = torch.Generator().manual_seed(100 * step + world)
    x = 50.0 + 3.0 * torch.randn(n, *SHAPES[case], generator=g)
    return x, torch.randn(n, *SHAPES[case], generator=g)


def rank_slice(case: str, world: int, rank: int) -> slice:
    sizes = SIZES[case][world]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def layer_input(case: str, x: torch.Tensor) -> torch.Tensor:
    """The in-place layer gets a non-leaf (as after a convolution), which it overwrites."""
    return x * 1.0 if case == "inplace" else x


def run_case(case: str, rank: int, world: int) -> dict:
    layer = make_layer(case)
    sync = bnlab.SyncBatchNorm.convert_sync_batchnorm(layer)
    out: dict = {"class": type(sync).__name__, "steps": []}
    for step in range(STEPS):
        x, gy = batch(case, world, step)
        sl = rank_slice(case, world, rank)
        xr = x[sl].clone().requires_grad_(True)
        sync.zero_grad()
        y = sync(layer_input(case, xr))
        (y * gy[sl]).sum().backward()
        rec = {"y": y.detach(), "dx": xr.grad}
        if sync.affine:
            rec["dw"], rec["db"] = sync.weight.grad.clone(), sync.bias.grad.clone()
        rec["rm"], rec["rv"] = sync.running_mean.clone(), sync.running_var.clone()
        rec["nbt"] = int(sync.num_batches_tracked)
        out["steps"].append(rec)
    return out


def main() -> None:
    rank, world, init_file, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    results = {}
    for case in ("bn2d", "act", "bn1d", "fused", "window", "inplace"):
        results[case] = run_case(case, rank, world)
    try:
        run_case("tiny", rank, world)
        results["tiny"] = "no error"
    except ValueError as e:
        results["tiny"] = str(e)
    # After the failed case every rank is still in step: one more collective must succeed.
    t = torch.ones(1)
    dist.all_reduce(t)
    results["after"] = float(t)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
