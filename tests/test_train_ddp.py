"""``bnlab train --nproc-per-node 2``: the trainer on 2 gloo ranks through torchrun.

Tiny runs (MNIST-1D, 512 training sequences, 1 epoch of 8 global batches of 64) with bounded
timeouts: torchrun and every collective are killed or fail instead of hanging.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bnlab.lab.train import TrainConfig, read_jsonl
from bnlab.lab.train.ddp import launch_train
from bnlab.lab.train.replicas import Local, Replicas
from tests._dist_util import env

BASE = dict(model="mnist1d_mlp", dataset="mnist1d", epochs=1, batch_size=64, train_subset=512,
            test_subset=200, threads=1)


def _launch(cfg: TrainConfig, out, dump) -> int:
    try:
        return launch_train(cfg, out, timeout_s=30, dump_states=str(dump), quiet=True,
                            env=env())
    except subprocess.TimeoutExpired:  # launch() killed the group: a hang fails, not blocks
        pytest.fail("distributed training did not finish within the timeout")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    single = TrainConfig(**BASE)
    # the single-process reference, in a subprocess like the ranks (same thread settings)
    subprocess.run([sys.executable, "-m", "bnlab", "train", "--quiet", "--out",
                    str(root / "single"), *sum((["--set", f"{k}={v}"] for k, v in
                                                single.to_dict().items()
                                                if k in BASE), [])],
                   env=env(), check=True, timeout=120, capture_output=True)
    out = {}
    for name, sync in (("sync", True), ("local", False)):
        cfg = TrainConfig(**BASE, nproc_per_node=2, sync_bn=sync)
        assert _launch(cfg, root / name, root / f"{name}-states") == 0
        out[name] = root / name
    return root, out


@pytest.mark.parametrize("name", ["sync", "local"])
def test_ranks_end_equal_and_rank0_writes_one_run_dir(runs, name):
    root, out = runs
    run = out[name]
    assert {p.name for p in run.iterdir()} == {
        "config.toml", "environment.json", "steps.jsonl", "epochs.jsonl", "summary.json",
        "checkpoint.pt", "manifest.json", ".lock"}
    steps = read_jsonl(run / "steps.jsonl")
    assert [s["step"] for s in steps] == list(range(8))  # written once, not once per rank
    cfg = TrainConfig.from_toml(run / "config.toml")
    assert (cfg.nproc_per_node, cfg.sync_bn) == (2, name == "sync")
    assert json.loads((run / "environment.json").read_text())["world_size"] == 2
    r0, r1 = (torch.load(root / f"{name}-states" / f"rank{r}.pt") for r in (0, 1))
    assert r0.keys() == r1.keys() and any("running_var" in k for k in r0)
    for k in r0:  # DDP keeps parameters equal, sync_running_stats the BN buffers
        assert torch.equal(r0[k], r1[k]), k
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(ckpt[k], r0[k]) for k in r0)


def test_syncbn_on_two_ranks_matches_one_process_on_the_global_batch(runs):
    root, out = runs
    single = read_jsonl(root / "single" / "steps.jsonl")
    for name, close in (("sync", True), ("local", False)):
        steps = read_jsonl(out[name] / "steps.jsonl")
        diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(single, steps, strict=True))
        # SyncBN: statistics of the global batch, as one process: equal up to rounding.
        # Local BN: each rank normalises its half batch, so the losses differ.
        assert (diff < 1e-4) is close, (name, diff)


def test_shards_split_the_global_batch():
    class Info:
        rank, world_size, is_main, device = 1, 2, False, torch.device("cpu")

    idx = torch.arange(10)
    assert Replicas(Info()).shard(idx).tolist() == [1, 3, 5, 7, 9]
    assert Replicas(Info()).shard(torch.tensor([4])).tolist() == [4]  # never empty
    assert Local().shard(idx) is idx


def test_config_checks():
    with pytest.raises(ValueError, match="sync_bn needs nproc_per_node > 1"):
        TrainConfig(sync_bn=True)
    with pytest.raises(ValueError, match="nproc_per_node must be >= 1, got 0"):
        TrainConfig(nproc_per_node=0)
    from bnlab.lab.train import train

    with pytest.raises(ValueError, match="nproc_per_node=2 but this process is one of 1"):
        train(TrainConfig(**BASE, nproc_per_node=2), "/nonexistent/never-written")
