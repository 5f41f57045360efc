"""A run directory is one transaction per epoch: a real run killed at each of its writes, then
``--resume``, ends equal to an uninterrupted run, or is refused clearly and stays usable.

Each kill is SIGKILL from inside the process at the N-th write point
(``BNLAB_KILL_AT``, :func:`bnlab.lab.train.rundir.fault_point`): after a file is opened, half
of it written (a torn write), before each rename. The run is ``tests/_fault_run.py`` in a
subprocess; the resume runs here, and the logs (less wall-clock times), the BN monitor rows and
the final weights are compared with those of the uninterrupted run, bitwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bnlab.lab.cli import main
from bnlab.lab.train import ResumeError, load_checkpoint, read_jsonl, train
from bnlab.lab.train.rundir import read_json
from tests._fault_run import CONFIG, synthetic

ROOT = Path(__file__).resolve().parent.parent
#: the files of one commit, in the order they are written
COMMITTED = ("checkpoint.pt", "steps.jsonl", "epochs.jsonl", "monitor.jsonl", "summary.json")


def _atomic(name: str) -> list[str]:
    return [f"write {name}", f"half {name}", f"rename {name}"]


def _commit() -> list[str]:
    return ([p for n in COMMITTED for p in (f"write {n}", f"half {n}")]
            + ["write manifest.json", "half manifest.json", "commit manifest.json"]
            + [f"publish {n}" for n in COMMITTED])


#: every write of a two-epoch run, in order: what the run directory holds between two of them
#: is what a kill there leaves
POINTS = _atomic("config.toml") + _atomic("environment.json") + _commit() + _commit()


def _run(out: Path, *, env: dict[str, str], resume: bool = False
         ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests._fault_run", str(out),
                           *(["--resume"] if resume else [])],
                          cwd=ROOT, env={**os.environ, "BNLAB_DEBUG": "", **env},
                          capture_output=True, text=True, timeout=300)


def _no_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if "time" not in k} for r in rows]


def _state(run: Path) -> dict:
    return {"steps": _no_times(read_jsonl(run / "steps.jsonl")),
            "epochs": _no_times(read_jsonl(run / "epochs.jsonl")),
            "monitor": _no_times(read_jsonl(run / "monitor.jsonl")),
            "status": read_json(run / "summary.json")["status"],
            "files": sorted(p.name for p in run.iterdir())}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, with the names of its write points traced."""
    root = tmp_path_factory.mktemp("faults")
    trace = root / "trace.txt"
    r = _run(root / "ref", env={"BNLAB_FAULT_TRACE": str(trace)})
    assert r.returncode == 0, r.stderr
    return root / "ref", trace.read_text().splitlines()


def test_the_points_are_every_write_of_the_run(reference):
    run, trace = reference
    assert trace == POINTS
    assert _state(run)["files"] == sorted(
        ["config.toml", "environment.json", "manifest.json", ".lock", *COMMITTED])


@pytest.mark.parametrize("n", range(1, len(POINTS) + 1),
                         ids=[f"{i:02d}-{p.replace(' ', '-')}" for i, p in enumerate(POINTS, 1)])
def test_killed_at_a_write_then_resumed_equals_the_uninterrupted_run(n, reference, tmp_path,
                                                                     capsys):
    ref, _ = reference
    out = tmp_path / "run"
    killed = _run(out, env={"BNLAB_KILL_AT": str(n)})
    assert killed.returncode == -9, (killed.returncode, killed.stderr)  # SIGKILL: died there
    left = _unfinished(out)
    capsys.readouterr()
    if n <= POINTS.index("rename config.toml") + 1:
        # killed before config.toml existed: nothing to resume, said plainly; the directory
        # takes a new run
        with pytest.raises(ResumeError, match=r"holds no run \(it is empty\)"):
            train(CONFIG, out, dataset=synthetic(), resume=True)
        train(CONFIG, out, dataset=synthetic())
    else:
        train(CONFIG, out, dataset=synthetic(), resume=True)
        err = capsys.readouterr().err
        if left:  # a file half written, or staged and not committed: removed, and said so
            assert f"removed {', '.join(left)}: an unfinished write" in err, err
        else:
            assert "removed" not in err, err
    assert _state(out) == _state(ref), POINTS[n - 1]
    got, want = load_checkpoint(out)["model"], load_checkpoint(ref)["model"]
    assert all(torch.equal(got[k], want[k]) for k in want), POINTS[n - 1]


def _unfinished(run: Path) -> list[str]:
    """The temporary and staged files a kill left that no commit names."""
    left = {p.name for p in run.iterdir() if p.name.startswith(".") and p.name != ".lock"}
    if (run / "manifest.json").exists():
        m = read_json(run / "manifest.json")
        left -= {f".{n}.g{m['generation']}" for n in m["files"]}
    return sorted(left)


def test_a_report_reads_the_last_commit_before_it_is_published(tmp_path):
    """Killed after the second commit, before its epochs.jsonl was renamed into place: the
    report (which never writes a run directory) reads both epochs."""
    from bnlab.lab.report.collect import load_runs

    out = tmp_path / "run"
    second = len(POINTS) - POINTS[::-1].index("publish epochs.jsonl")
    assert _run(out, env={"BNLAB_KILL_AT": str(second)}).returncode == -9
    assert len(read_jsonl(out / "epochs.jsonl")) == 1  # the first commit's, under its name
    (run,) = load_runs([out])
    assert [e["epoch"] for e in run.epochs] == [0, 1] and len(run.steps) == 6
    assert run.summary["status"] == "complete"


def test_the_cli_resumes_a_run_killed_between_its_checkpoint_and_its_steps(tmp_path, capsys):
    """The case of issue 27 through ``bnlab train``: killed after checkpoint.pt was in place
    and before steps.jsonl was (lost 13 of 189 steps before commits), then --resume."""
    argv = ["train", "--quiet", "--dataset", "mnist1d", "--model", "mnist1d_mlp", "--epochs",
            "2", "--set", "train_subset=96", "--set", "test_subset=32", "--set",
            "batch_size=32", "--set", "threads=1"]
    cmd = [sys.executable, "-m", "bnlab", *argv]
    ref = subprocess.run([*cmd, "--out", str(tmp_path / "ref")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    points = _atomic("config.toml") + _atomic("environment.json") + [
        p for p in _commit() if "monitor" not in p]
    kill_at = points.index("publish steps.jsonl") + 1  # checkpoint.pt published, steps not
    r = subprocess.run([*cmd, "--out", str(tmp_path / "run")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "BNLAB_KILL_AT": str(kill_at)})
    assert r.returncode == -9, r.stderr
    run = tmp_path / "run"
    assert read_jsonl(run / "steps.jsonl") == []  # under its name: not yet published
    assert main([*argv, "--out", str(run), "--resume"]) == 0
    for name in ("steps.jsonl", "epochs.jsonl"):
        assert _no_times(read_jsonl(run / name)) == _no_times(read_jsonl(tmp_path / "ref" / name))
    assert len(read_jsonl(run / "steps.jsonl")) == 6


def test_resume_of_a_run_from_before_commits_drops_the_rows_past_its_checkpoint(tmp_path,
                                                                                 capsys):
    """A run written by bnlab before manifests (checkpoint.pt.sha256 beside the checkpoint)
    resumes; rows written after its checkpoint are dropped and trained again, and it says so;
    the next commit replaces the digest file with manifest.json."""
    import hashlib

    ref = tmp_path / "ref"
    train(CONFIG, ref, dataset=synthetic())
    run = tmp_path / "run"

    def crash(step: int) -> None:
        if step == 4:  # in the second epoch: the last commit is the first epoch's
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(CONFIG, run, dataset=synthetic(), on_step=crash)
    # as the old trainer left it: a digest file beside the checkpoint, no manifest, and a row
    # written after the checkpoint
    (run / "manifest.json").unlink()
    digest = hashlib.sha256((run / "checkpoint.pt").read_bytes()).hexdigest()
    (run / "checkpoint.pt.sha256").write_text(f"{digest}  checkpoint.pt\n")
    with (run / "steps.jsonl").open("a") as f:
        f.write('{"step": 3, "epoch": 1, "loss": 9.0, "acc": 0.0, "lr": 0.0, "time": 0.0}\n')
    capsys.readouterr()
    train(CONFIG, run, dataset=synthetic(), resume=True)
    err = capsys.readouterr().err
    assert "dropped 1 row(s) of steps.jsonl written after the checkpoint (step 3)" in err, err
    assert _state(run) == _state(ref)
    assert not (run / "checkpoint.pt.sha256").exists()
