"""One rank of the synchronised MaskedBatchNorm1d checks (run by tests/test_masked_sync.py).

Usage: python _masked_sync_worker.py RANK WORLD INIT_FILE OUT_DIR
Every case builds the same global padded batch on every rank from a seed, takes this rank's
samples (counts differ between ranks; one rank's samples are padding only, or it has none)
and saves outputs, gradients and running statistics for the test to compare with one process
on the whole batch.
"""

from __future__ import annotations

import contextlib
import datetime
import sys

import torch
import torch.distributed as dist

import bnlab

C, L, STEPS = 3, 6, 3
# case -> (samples per rank for world 2, layout, how the layer synchronises, backend)
CASES = {
    "ncl": ([3, 2], "ncl", "group", None),
    "nlc": ([2, 3], "nlc", "group", None),
    "converted": ([4, 1], "ncl", "convert", None),
    "lengths": ([3, 2], "nlc", "convert", None),
    "empty": ([5, 0], "ncl", "group", None),
    "tensor_ops": ([3, 2], "nlc", "group", "torch"),
    "no_mask": ([3, 2], "ncl", "group", None),
}
#: the rank whose samples are all padding at each step (None: both ranks have valid positions,
#: in different numbers), for every masked case but "empty" (whose rank 1 has no sample)
PAD_ONLY = (1, None, 0)


def make_layer(layout: str, **kw) -> bnlab.MaskedBatchNorm1d:
    layer = bnlab.MaskedBatchNorm1d(C, momentum=0.3, layout=layout, dtype=torch.float64, **kw)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, -0.7, 0.9], dtype=torch.float64))
        layer.bias.copy_(torch.tensor([0.1, -0.3, 0.2], dtype=torch.float64))
    return layer


def batch(case: str, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global (N, C, L) input with a large common offset and padding far from the data,
    its mask, lengths (the mask is their prefix form) and upstream gradient."""
    sizes = CASES[case][0]
    n = sum(sizes)
    g = torch.Generator().manual_seed(1000 * step + len(case))
    lengths = torch.randint(1, L + 1, (n,), generator=g)
    pad = PAD_ONLY[step] if case not in ("empty", "no_mask") else None
    if pad is not None:
        start = sum(sizes[:pad])
        lengths[start : start + sizes[pad]] = 0
    elif int(lengths[: sizes[0]].sum()) == int(lengths[sizes[0] :].sum()):
        lengths[0] -= 1  # the ranks' valid counts differ
    mask = torch.arange(L)[None, :] < lengths[:, None]
    if case == "no_mask":
        mask = torch.ones(n, L, dtype=torch.bool)
    x = 50.0 + 3.0 * torch.randn(n, C, L, generator=g, dtype=torch.float64)
    x = torch.where(mask[:, None, :], x, torch.full_like(x, 1e4))
    return x, mask, lengths, torch.randn(n, C, L, generator=g, dtype=torch.float64)


def rank_slice(case: str, rank: int) -> slice:
    sizes = CASES[case][0]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def run_case(case: str, rank: int) -> dict:
    _, layout, how, backend = CASES[case]
    if how == "group":  # a group given to the layer
        layer = make_layer(layout, process_group=dist.new_group([0, 1]))
    else:  # the converter: process_group None, the default group
        layer = bnlab.SyncBatchNorm.convert_sync_batchnorm(make_layer(layout))
    out: dict = {"class": type(layer).__name__, "sync": layer.sync, "steps": []}
    for step in range(STEPS):
        x, mask, lengths, gy = batch(case, step)
        sl = rank_slice(case, rank)
        xr = x[sl].clone()
        if layout == "nlc":
            xr, gr = xr.transpose(1, 2).contiguous(), gy[sl].transpose(1, 2)
        else:
            gr = gy[sl]
        xr.requires_grad_(True)
        layer.zero_grad()
        kw = {"lengths": lengths[sl]} if case == "lengths" else {"mask": mask[sl]}
        with bnlab.kernels.use_backend(backend) if backend else contextlib.nullcontext():
            y = layer(xr) if case == "no_mask" else layer(xr, **kw)
            (y * gr).sum().backward()
        dx = xr.grad
        if layout == "nlc":
            y, dx = y.transpose(1, 2), dx.transpose(1, 2)
        out["steps"].append({
            "y": y.detach().clone(), "dx": dx.clone(), "dw": layer.weight.grad.clone(),
            "db": layer.bias.grad.clone(), "rm": layer.running_mean.clone(),
            "rv": layer.running_var.clone(), "nbt": int(layer.num_batches_tracked),
        })  # fmt: skip
    return out


def too_few(rank: int) -> dict:
    """One valid position over both ranks: ValueError on every rank, state unchanged."""
    layer = bnlab.SyncBatchNorm.convert_sync_batchnorm(make_layer("ncl"))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    mask = torch.zeros(2, L, dtype=torch.bool)
    if rank == 0:
        mask[1, 2] = True
    try:
        layer(torch.randn(2, C, L, dtype=torch.float64), mask=mask)
        msg = "no error"
    except ValueError as e:
        msg = str(e)
    same = all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    return {"error": msg, "unchanged": same}


def main() -> None:
    rank, world, init_file, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    results = {case: run_case(case, rank) for case in CASES}
    results["too_few"] = too_few(rank)
    # after the refused batch every rank is still in step: one more collective must succeed
    t = torch.ones(1)
    dist.all_reduce(t)
    results["after"] = float(t)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
