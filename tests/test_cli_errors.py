"""User mistakes and environment faults end in one line on stderr and exit 2, no traceback."""

from __future__ import annotations

import os

import pytest

from bnlab.cli import main
from bnlab.train.rundir import lock_run_dir


def _garbage(tmp_path):
    p = tmp_path / "garbage.pt"
    p.write_bytes(b"not a checkpoint at all")
    return str(p)


def _truncated(tmp_path):
    import torch

    p = tmp_path / "cut.pt"
    torch.save({"w": torch.ones(1000)}, p)
    p.write_bytes(p.read_bytes()[:200])
    return str(p)


def _a_file(tmp_path):
    p = tmp_path / "plain-file"
    p.write_text("x")
    return str(p)


CASES = [
    # (argv builder, phrase the one-line message contains)
    (lambda t: ["study", "run", "nosuch"], "unknown study 'nosuch'"),
    (lambda t: ["train", "--out", str(t / "r"), "--set", "steps=abc"], "steps"),
    (lambda t: ["train", "--out", str(t / "r"), "--set", "momentum=nan"],
     "momentum must be a float in"),
    (lambda t: ["train", "--out", str(t / "r"), "--set", "threads=100000"],
     "threads must be at most"),
    (lambda t: ["fold", _garbage(t), "--model", "bnlab.models:seed_cnn"],
     "not a state-dict checkpoint"),
    (lambda t: ["fold", _truncated(t), "--model", "bnlab.models:seed_cnn"],
     "not a state-dict checkpoint"),
    (lambda t: ["fold", str(t / "missing.pt"), "--model", "bnlab.models:seed_cnn"],
     "missing.pt"),
    (lambda t: ["train", "--out", _a_file(t) + "/sub", "--set", "epochs=1"], "plain-file"),
    (lambda t: ["fold", _garbage(t), "--model", "bnlab.models:seed_cnn",
                "--out", str(t / "garbage.pt")], "is the input checkpoint"),
]  # fmt: skip


@pytest.mark.parametrize("case", range(len(CASES)))
def test_mistake_gives_one_line_and_exit_2(case, tmp_path, capsys):
    build, phrase = CASES[case]
    rc = main(build(tmp_path))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert phrase in err, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_locked_run_directory(tmp_path, capsys):
    with lock_run_dir(tmp_path):
        rc = main(["train", "--out", str(tmp_path), "--set", "epochs=1",
                   "--set", "dataset=mnist1d", "--set", "model=mnist1d_mlp"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and f"(pid {os.getpid()})" in err and "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path):
    from bnlab.train.rundir import RunLockedError

    with lock_run_dir(tmp_path), pytest.raises(RunLockedError, match="being written"):
        main(["--debug", "train", "--out", str(tmp_path), "--set", "epochs=1",
              "--set", "dataset=mnist1d", "--set", "model=mnist1d_mlp"])  # fmt: skip
