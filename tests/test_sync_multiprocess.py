"""SyncBatchNorm with 2 and 3 gloo processes equals single-process BN on the whole batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests._dist_util import run_ranks
from tests._sync_worker import SIZES, STEPS, batch, layer_input, make_layer, rank_slice

WORKER = Path(__file__).with_name("_sync_worker.py")


def reference(case: str, world: int) -> list[dict]:
    """Single-process bnlab/torch BN on the concatenated batch, in float32."""
    layer = make_layer(case)
    recs = []
    for step in range(STEPS):
        x, gy = batch(case, world, step)
        x = x.clone().requires_grad_(True)
        layer.zero_grad()
        y = layer(layer_input(case, x))
        (y * gy).sum().backward()
        rec = {"y": y.detach(), "dx": x.grad}
        if layer.affine:
            rec["dw"], rec["db"] = layer.weight.grad.clone(), layer.bias.grad.clone()
        rec["rm"], rec["rv"] = layer.running_mean.clone(), layer.running_var.clone()
        rec["nbt"] = int(layer.num_batches_tracked)
        recs.append(rec)
    return recs


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def results(request, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp(f"sync{world}")
    run_ranks(WORKER, world, [str(tmp / "init"), str(tmp)], timeout=120)
    return world, [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


def max_errors(case: str, world: int, ranks: list[dict]) -> dict[str, float]:
    ref = reference(case, world)
    err: dict[str, float] = {}

    def note(key: str, a: torch.Tensor, b: torch.Tensor) -> None:
        err[key] = max(err.get(key, 0.0), (a - b).abs().max().item() if a.numel() else 0.0)

    for step in range(STEPS):
        r = ref[step]
        for rank, res in enumerate(ranks):
            got = res[case]["steps"][step]
            sl = rank_slice(case, world, rank)
            note("y", got["y"], r["y"][sl])
            note("dx", got["dx"], r["dx"][sl])
            note("running_mean", got["rm"], r["rm"])
            note("running_var", got["rv"], r["rv"])
            assert got["nbt"] == r["nbt"]
        if "dw" in r:
            note("dweight", sum(res[case]["steps"][step]["dw"] for res in ranks), r["dw"])
            note("dbias", sum(res[case]["steps"][step]["db"] for res in ranks), r["db"])
    return err


@pytest.mark.parametrize("case", ["bn2d", "act", "bn1d", "fused", "window", "inplace"])
def test_sync_equals_single_process_bn(results, case):
    world, ranks = results
    assert 0 in SIZES["bn2d"][3] and 1 in SIZES["bn1d"][2]  # the cases cover 0 and 1 samples
    err = max_errors(case, world, ranks)
    print(f"world={world} case={case} max abs errors: {err}")
    # Inputs have mean 50 and std 3; float32 statistics of the whole batch agree to ~1e-5.
    for key, e in err.items():
        assert e < 2e-4 if key.startswith("d") else e < 5e-5, (key, e)


def test_converter_kept_subclass_in_every_rank(results):
    _, ranks = results
    # torch layers become bnlab.SyncBatchNorm; bnlab layers keep their class and synchronise
    assert {res["act"]["class"] for res in ranks} == {"BNReLU2d"}
    assert {res["bn2d"]["class"] for res in ranks} == {"SyncBatchNorm"}
    assert {res["fused"]["class"] for res in ranks} == {"BatchNormAct2d"}
    # the activation ran: outputs of the fused layer are never negative
    assert all((s["y"] >= 0).all() for res in ranks for s in res["act"]["steps"])


def test_too_small_global_batch_raises_on_every_rank(results):
    world, ranks = results
    for res in ranks:
        assert "Expected more than 1 value per channel when training, got 1 over all ranks" in (
            res["tiny"]
        )
        assert res["after"] == world
