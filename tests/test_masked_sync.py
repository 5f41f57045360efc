"""MaskedBatchNorm1d synchronised over 2 gloo processes equals one process on the whole batch:
outputs at valid positions, running statistics and input/weight/bias gradients of torch's
BatchNorm1d applied to the valid positions of the concatenated batch (float64), with per-rank
sample counts that differ, one rank whose samples are padding only (or that has none)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tests._dist_util import run_ranks
from tests._masked_sync_worker import CASES, PAD_ONLY, STEPS, C, batch, make_layer, rank_slice

WORKER = Path(__file__).with_name("_masked_sync_worker.py")
WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("masked_sync")
    run_ranks(WORKER, WORLD, [str(tmp / "init"), str(tmp)], timeout=180)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def reference(case: str) -> list[dict]:
    """torch's BatchNorm1d on the valid positions (as (n_valid, C) rows) of the whole batch."""
    ref = nn.BatchNorm1d(C, momentum=0.3, dtype=torch.float64)
    ref.load_state_dict(make_layer("ncl").state_dict())
    recs = []
    for step in range(STEPS):
        x, mask, _, gy = batch(case, step)
        xv = x.transpose(1, 2)[mask].clone().requires_grad_(True)
        ref.zero_grad()
        yv = ref(xv)
        (yv * gy.transpose(1, 2)[mask]).sum().backward()
        recs.append({"mask": mask, "y": yv.detach(), "dx": xv.grad, "dw": ref.weight.grad.clone(),
                     "db": ref.bias.grad.clone(), "rm": ref.running_mean.clone(),
                     "rv": ref.running_var.clone(), "nbt": int(ref.num_batches_tracked)})
    return recs


def _valid(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)[mask]


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_equal_one_process(ranks, case):
    sizes = CASES[case][0]
    for step in range(STEPS):  # what each step covers
        mask = batch(case, step)[1]
        counts = [int(mask[rank_slice(case, r)].sum()) for r in range(WORLD)]
        if case == "empty":
            assert sizes[1] == 0
        elif case != "no_mask" and PAD_ONLY[step] is not None:
            assert counts[PAD_ONLY[step]] == 0 and sum(counts) > 1
        else:  # both ranks hold valid positions: the cross-rank terms matter
            assert min(counts) > 1 and counts[0] != counts[1], counts
    for res in ranks:
        assert res[case]["sync"] and res[case]["class"] == "MaskedBatchNorm1d"
    for step, r in enumerate(reference(case)):
        mask = r["mask"]
        ys, dxs = [], []
        for rank, res in enumerate(ranks):
            got = res[case]["steps"][step]
            m = mask[rank_slice(case, rank)]
            assert got["y"].shape == (sizes[rank], C, mask.shape[1])
            pad_pos = ~m[:, None, :].expand_as(got["y"])
            assert (got["y"][pad_pos] == 0).all() and (got["dx"][pad_pos] == 0).all()
            ys.append(_valid(got["y"], m))
            dxs.append(_valid(got["dx"], m))
            for key in ("rm", "rv"):
                torch.testing.assert_close(got[key], r[key], atol=1e-12, rtol=1e-12)
            assert got["nbt"] == r["nbt"] == step + 1
        # the valid positions in rank order are the whole batch's, in its order
        torch.testing.assert_close(torch.cat(ys), r["y"], atol=1e-12, rtol=0)
        torch.testing.assert_close(torch.cat(dxs), r["dx"], atol=1e-12, rtol=0)
        # each rank's parameter gradient is its share: their sum (what DDP reduces) is the whole
        for key in ("dw", "db"):
            total = sum(res[case]["steps"][step][key] for res in ranks)
            torch.testing.assert_close(total, r[key], atol=1e-11, rtol=0)
        pad = PAD_ONLY[step] if case not in ("empty", "no_mask") else None
        if pad is not None:  # the padding-only rank contributes nothing of its own
            got = ranks[pad][case]["steps"][step]
            assert (got["dw"] == 0).all() and (got["db"] == 0).all()


def test_too_few_valid_positions_over_all_ranks_raise_on_every_rank(ranks):
    for res in ranks:
        assert res["too_few"]["error"].startswith(
            "MaskedBatchNorm1d: Expected more than 1 valid position per channel when training, "
            "got 1 over all ranks"
        )
        assert res["too_few"]["unchanged"]
        assert res["after"] == WORLD
