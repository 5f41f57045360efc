"""DDP training through torchrun, running-statistics sync, and a killed rank (never a hang)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from bnlab.lab.distributed import launch, torchrun_command
from bnlab.lab.distributed import worker as worker_main
from bnlab.lab.models import small_cnn
from bnlab.lab.train import TrainConfig, read_json, read_jsonl
from tests._dist_util import env


def worker_args(out, *extra: str) -> list[str]:
    return ["--out", str(out / "run"), "--steps", "4", "--batch-size", "8", "--timeout", "30",
            "--dump-states", str(out / "states"), *extra]


@pytest.mark.parametrize("sync_bn", [True, False], ids=["syncbn", "localbn"])
def test_torchrun_training_ranks_agree(tmp_path, sync_bn):
    extra = ["--sync-bn"] if sync_bn else []
    rc = launch(2, args=worker_args(tmp_path, *extra), timeout_s=180, env=env())
    assert rc == 0
    run = tmp_path / "run"
    # the trainer's run directory, written once by rank 0, for the lab's small CNN (no copy
    # of a network in the worker) on a real dataset: 4 steps of a global batch of 2 x 8
    cfg = TrainConfig.from_toml(run / "config.toml")
    assert (cfg.model, cfg.dataset, cfg.train_subset) == ("small_cnn", "fashion-mnist", 64)
    assert (cfg.nproc_per_node, cfg.sync_bn, cfg.batch_size) == (2, sync_bn, 16)
    assert json.loads((run / "environment.json").read_text())["world_size"] == 2
    assert [s["step"] for s in read_jsonl(run / "steps.jsonl")] == [0, 1, 2, 3]
    assert read_json(run / "summary.json")["status"] == "complete"
    r0, r1 = (torch.load(tmp_path / "states" / f"rank{r}.pt") for r in (0, 1))
    lab = small_cnn("bn").state_dict()
    assert r0.keys() == r1.keys() == lab.keys()
    assert all(r0[k].shape == lab[k].shape for k in lab)
    for k in r0:
        # DDP keeps parameters equal; sync_running_stats makes BN buffers equal too.
        torch.testing.assert_close(r0[k], r1[k], atol=1e-6, rtol=1e-6, msg=k)
    assert int(r0["2.num_batches_tracked"]) == 4
    assert (r0["2.running_var"] != 1).all()


def test_the_worker_refuses_more_steps_than_the_training_set_holds():
    args = worker_main._parse(["--out", "unused", "--steps", "5000", "--batch-size", "8"])
    with pytest.raises(ValueError, match=r"--steps 5000 of a global batch of 16 \(2 ranks x "
                                         r"--batch-size 8\) need 80000 training images, but "
                                         r"fashion-mnist has 60000; use --steps 3750 or fewer"):
        worker_main.example_config(args, 2)
    assert worker_main.example_config(
        worker_main._parse(["--out", "unused", "--steps", "3750", "--batch-size", "8"]), 2
    ).train_subset == 60000


def test_torchrun_command_and_bad_nproc():
    cmd = torchrun_command(3, "bnlab.lab.distributed.worker", ["--steps", "1"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "3" and cmd[-2:] == ["--steps", "1"]
    with pytest.raises(ValueError, match="nproc_per_node must be a positive int, got 0"):
        torchrun_command(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_killed_rank_makes_the_other_stop_with_a_clear_error(tmp_path):
    port, world = _free_port(), 2
    procs = []
    for r in range(world):
        e = env() | {
            "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        }
        args = worker_args(tmp_path, "--step-delay", "0.2")
        args[args.index("--steps") + 1] = "1000"
        args[args.index("--timeout") + 1] = "20"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "bnlab.lab.distributed.worker", *args], env=e,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    try:
        victim = procs[1]
        deadline = time.monotonic() + 120
        for line in victim.stdout:  # wait until training is under way
            if "step 2 " in line or time.monotonic() > deadline:
                break
        assert victim.poll() is None, "rank 1 ended before it could be killed"
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        took = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    print(f"rank 0 exited {took:.1f} s after rank 1 was killed")
    assert procs[0].returncode == 1
    assert "bnlab.lab.distributed.worker: rank 0 stopped" in err
    assert took < 45, took
    assert not (tmp_path / "run" / "summary.json").exists()  # no epoch was committed


def test_torchrun_stops_everything_when_a_worker_is_killed(tmp_path):
    args = worker_args(tmp_path, "--step-delay", "0.2")
    args[args.index("--steps") + 1] = "1000"
    proc = subprocess.Popen(
        torchrun_command(2, args=args), env=env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        pid, last_step, seen = None, -1, []
        deadline = time.monotonic() + 120
        # Lines from the two ranks interleave in any order: find rank 1's pid wherever it
        # appears, and kill it once it is known and training has taken a couple of steps.
        for line in proc.stdout:
            seen.append(line)
            if m := re.search(r"rank 1 pid (\d+)", line):
                pid = int(m.group(1))
            if m := re.search(r"rank \d+ step (\d+) ", line):
                last_step = max(last_step, int(m.group(1)))
            if (pid is not None and last_step >= 2) or time.monotonic() > deadline:
                break
        assert pid is not None, "rank 1 never reported its pid:\n" + "".join(seen[-40:])
        os.kill(pid, signal.SIGKILL)
        proc.stdout.close()
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc != 0
