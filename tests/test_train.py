"""The trainer: config loading, determinism, checkpoints, Ctrl-C and exact resume."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from bnlab.lab.data import Dataset
from bnlab.lab.train import (
    RunExistsError,
    TrainConfig,
    load_checkpoint,
    lr_at,
    parse_overrides,
    read_jsonl,
    train,
)
from bnlab.lab.train.rundir import read_json
from tests._fault_run import synthetic


def _synthetic(n_train=160, n_test=64, seed=0) -> Dataset:
    # Unit tests train on synthetic tensors: class-dependent bumps plus noise, 1x28x28 (the
    # same maker as the fault-injection run's).
    return synthetic(n_train, n_test, seed)


def _cfg(**kw) -> TrainConfig:
    base = dict(norm="bn-window", epochs=3, batch_size=32, schedule="cosine", seed=3, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _strip_times(records):
    return [{k: v for k, v in r.items() if "time" not in k} for r in records]


def _metrics(run):
    steps, epochs = read_jsonl(run / "steps.jsonl"), read_jsonl(run / "epochs.jsonl")
    return _strip_times(steps), _strip_times(epochs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref")
    summary = train(_cfg(), run, dataset=_synthetic())
    return run, summary


def test_run_directory_contents(reference):
    run, summary = reference
    names = {p.name for p in run.iterdir()}
    assert {"config.toml", "environment.json", "steps.jsonl", "epochs.jsonl", "summary.json",
            "checkpoint.pt"} <= names
    # no temporary file left behind; .lock is the directory's lock file (it holds a pid)
    assert not any(n.startswith(".") for n in names - {".lock"})
    assert (run / ".lock").read_text().strip().isdigit()
    manifest = read_json(run / "manifest.json")  # the last commit: its step and files
    assert (manifest["step"], manifest["epoch"]) == (15, 3)
    assert set(manifest["files"]) == {"checkpoint.pt", "steps.jsonl", "epochs.jsonl",
                                      "summary.json"}
    steps, epochs = _metrics(run)
    assert len(steps) == 3 * 5 and [r["epoch"] for r in epochs] == [0, 1, 2]
    assert set(steps[0]) == {"step", "epoch", "loss", "acc", "lr"}
    assert summary["status"] == "complete" and summary["epochs_done"] == 3
    assert summary["best_val_acc"] == max(r["val_acc"] for r in epochs)
    env = read_json(run / "environment.json")
    assert {"torch", "bnlab", "torch_threads", "git_revision", "data_source"} <= set(env)
    assert TrainConfig.from_toml(run / "config.toml") == _cfg()
    assert steps[-1]["loss"] < steps[0]["loss"]  # it learns something


def test_same_config_same_numbers(reference, tmp_path):
    train(_cfg(), tmp_path, dataset=_synthetic())
    assert _metrics(tmp_path) == _metrics(reference[0])


def test_other_seed_other_numbers(reference, tmp_path):
    train(_cfg(seed=4), tmp_path, dataset=_synthetic())
    assert _metrics(tmp_path)[0] != _metrics(reference[0])[0]


def test_ctrl_c_saves_and_resume_is_exact(reference, tmp_path):
    def interrupt(step):
        if step == 7:  # in the middle of the second epoch
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(), tmp_path, dataset=_synthetic(), on_step=interrupt)
    ckpt = load_checkpoint(tmp_path)
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["step"]) == (1, 2, 7)
    assert read_json(tmp_path / "summary.json")["status"] == "interrupted"
    assert len(read_jsonl(tmp_path / "steps.jsonl")) == 7
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    train(_cfg(), tmp_path, dataset=_synthetic(), resume=True)
    assert _metrics(tmp_path) == _metrics(reference[0])
    ref_state = load_checkpoint(reference[0])["model"]
    state = load_checkpoint(tmp_path)["model"]
    assert all(torch.equal(ref_state[k], state[k]) for k in ref_state)


def test_crash_resumes_from_last_epoch_checkpoint(reference, tmp_path):
    def crash(step):
        if step == 13:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_cfg(), tmp_path, dataset=_synthetic(), on_step=crash)
    assert load_checkpoint(tmp_path)["epoch"] == 2
    train(_cfg(), tmp_path, dataset=_synthetic(), resume=True)
    assert _metrics(tmp_path) == _metrics(reference[0])


def test_existing_run_needs_resume_and_same_config(reference, tmp_path):
    with pytest.raises(RunExistsError, match="pass --resume"):
        train(_cfg(), reference[0], dataset=_synthetic())
    with pytest.raises(ValueError, match=r"--resume with another config.*'lr': \(0.001, 0.01\)"):
        train(_cfg(lr=0.01), reference[0], dataset=_synthetic(), resume=True)
    # resuming a complete run trains nothing more and returns its summary
    before = (reference[0] / "steps.jsonl").read_text()
    assert train(_cfg(), reference[0], dataset=_synthetic(), resume=True)["status"] == "complete"
    assert (reference[0] / "steps.jsonl").read_text() == before


def test_sgd_and_step_schedule(tmp_path):
    s = train(_cfg(optimizer="sgd", lr=0.05, schedule="step", gamma=0.5, epochs=2, norm="none"),
              tmp_path, dataset=_synthetic())
    lrs = [r["lr"] for r in read_jsonl(tmp_path / "steps.jsonl")]
    assert lrs == [0.05] * 5 + [0.025] * 5
    assert s["status"] == "complete"


def test_config_from_toml_and_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('norm = "bn"\nepochs = 2\nlr = 1\n')
    c = TrainConfig.from_toml(p)
    assert (c.norm, c.epochs, c.lr) == ("bn", 2, 1.0) and isinstance(c.lr, float)
    p.write_text(c.to_toml())
    assert TrainConfig.from_toml(p) == c
    p.write_text("epoch = 2\n")
    with pytest.raises(ValueError, match="unknown key\\(s\\) epoch; valid keys: batch_size"):
        TrainConfig.from_toml(p)
    p.write_text('epochs = "two"\n')
    with pytest.raises(TypeError, match="epochs must be int, got 'two'"):
        TrainConfig.from_toml(p)
    assert parse_overrides(["epochs=4", "lr=0.5", "norm=gn"]) == {"epochs": 4, "lr": 0.5,
                                                                    "norm": "gn"}
    with pytest.raises(ValueError, match="--set: unknown key 'epoch'"):
        parse_overrides(["epoch=4"])
    with pytest.raises(ValueError, match="--set epochs: expected int, got 'x'"):
        parse_overrides(["epochs=x"])
    with pytest.raises(ValueError, match="unknown normaliser 'bnx'"):
        TrainConfig(norm="bnx")
    with pytest.raises(ValueError, match=r"one of \['adam', 'sgd'\], got 'rmsprop'"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="model 'small_cnn' does not take 'mnist1d' inputs; "
                       "models for mnist1d: mnist1d_cnn, mnist1d_mlp"):
        TrainConfig(dataset="mnist1d")
    with pytest.raises(ValueError, match="epochs must be >= 1, got 0"):
        TrainConfig(epochs=0)


def test_lr_schedules():
    c = TrainConfig(lr=1.0, schedule="cosine", epochs=2)
    assert lr_at(c, 0, 10) == 1.0
    assert lr_at(c, 10, 10) == pytest.approx(0.5)
    assert lr_at(c, 20, 10) == pytest.approx(0.0)
    s = TrainConfig(lr=1.0, schedule="step", step_epochs=2, gamma=0.1)
    assert [lr_at(s, k * 10, 10) for k in range(5)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    assert json.loads(json.dumps(c.to_dict())) == c.to_dict()


@pytest.mark.parametrize("key,value,message", [
    ("momentum", float("nan"), "momentum must be a float in"),
    ("momentum", 1.5, "momentum must be a float in"),
    ("weight_decay", float("nan"), "weight_decay must be a finite float"),
    ("weight_decay", -0.1, "weight_decay must be a finite float"),
    ("gamma", float("nan"), "gamma"),
    ("gamma", float("inf"), "gamma"),
    ("lr", float("nan"), "lr must be a positive finite float"),
    ("threads", 100000, "threads must be at most 1024"),
])  # fmt: skip
def test_nonfinite_and_out_of_range_settings_are_refused(key, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{key: value})


def test_second_writer_is_refused_naming_the_directory_and_pid(tmp_path):
    import os

    from bnlab.lab.train.rundir import RunLockedError, lock_run_dir

    with lock_run_dir(tmp_path):  # another run holds the directory
        with pytest.raises(RunLockedError, match=rf"{tmp_path} is being written by another "
                                                 rf"bnlab run \(pid {os.getpid()}\)"):
            train(_cfg(epochs=1), tmp_path, dataset=_synthetic())
    assert not (tmp_path / "config.toml").exists()  # nothing was written
    train(_cfg(epochs=1), tmp_path, dataset=_synthetic())  # free again once released


def test_bit_flipped_checkpoint_is_refused_on_resume(tmp_path):
    from bnlab.lab.train.rundir import CheckpointError

    cfg = _cfg(epochs=1)
    train(cfg, tmp_path, dataset=_synthetic())
    path = tmp_path / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"checkpoint.pt: SHA-256 .* the file is damaged"):
        train(cfg, tmp_path, dataset=_synthetic(), resume=True)


def test_sigterm_saves_and_marks_the_run_interrupted(tmp_path):
    before = signal.getsignal(signal.SIGTERM)

    def terminate(step):
        if step == 4:
            signal.raise_signal(signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(), tmp_path, dataset=_synthetic(), on_step=terminate)
    assert read_json(tmp_path / "summary.json")["status"] == "interrupted"
    assert load_checkpoint(tmp_path)["step"] == 4
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is restored
    summary = train(_cfg(), tmp_path, dataset=_synthetic(), resume=True)
    assert summary["status"] == "complete"


def test_disk_full_keeps_the_previous_commit_and_leaves_no_staged_file(tmp_path):
    import os
    import shutil
    import subprocess

    from bnlab.lab.train.commit import commit
    from bnlab.lab.train.rundir import checkpoint_bytes

    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("this machine does not let the test mount a tmpfs")
    try:
        commit(mnt, {"checkpoint.pt": checkpoint_bytes({"w": torch.ones(1000)}),  # 4 KB: fits
                     "steps.jsonl": b'{"step": 0}\n'}, step=1)
        before = {p.name: p.read_bytes() for p in mnt.iterdir()}
        with pytest.raises(OSError) as e:  # 800 KB: the disk is full
            commit(mnt, {"checkpoint.pt": checkpoint_bytes({"w": torch.ones(200_000)}),
                         "steps.jsonl": b'{"step": 0}\n{"step": 1}\n'}, step=2)
        assert e.value.errno == 28  # ENOSPC, named by the OS: "No space left on device"
        assert "writing checkpoint.pt for step 2; the previous checkpoint and logs are kept" in \
            str(e.value)
        assert {p.name: p.read_bytes() for p in mnt.iterdir()} == before
        assert load_checkpoint(mnt)["w"].shape == (1000,)  # digest still matches
        assert sorted(before) == ["checkpoint.pt", "manifest.json", "steps.jsonl"]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)  # lazy: even if a handle is open
