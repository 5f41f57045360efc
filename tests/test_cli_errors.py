"""User mistakes and environment faults: one line on stderr, a known exit code, no traceback.

The table below is the CLI's contract for bad input (issue 15). Each row is one mistake or
fault: an id, the command line (``{t}`` is the case's own temporary directory), an optional
setup that damages or prepares files there, the expected exit code, and a phrase the one-line
message must contain. Every case runs in-process through ``bnlab.lab.cli.main``; a few also run in a
real subprocess to show that no traceback reaches a terminal.

The tests run as root here, where ``chmod`` stops nothing (root writes into a read-only
directory): "read-only" cases are therefore made with other faults that stop root as well (a
file where a directory should be, a path under a file, a full disk on a small tmpfs).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shlex
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bnlab.lab.cli import main
from bnlab.lab.data import write_idx
from bnlab.lab.train.rundir import lock_run_dir

FASHION = Path("/usr/share/datasets/fashion-mnist")
HAVE_FASHION = all((FASHION / f"{n}.gz").is_file() for n in (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte"))
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
FACTORY = '''
from torch import nn

def make():
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16, 3))

def not_a_module():
    return 42


def raises():
    return nn.Nope(4)  # AttributeError inside the user's factory


def wide():  # a state dict large enough that torch.load of a cut copy fails with an OSError
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16, 100), nn.Linear(100, 100))
'''
#: flags that make `bnlab run small-cnn` tiny: one epoch on 32 examples, one normaliser
TINY_CNN = "--epochs 1 --norms none --train-subset 32 --test-subset 32 --batch-size 16 --quiet"


@dataclass
class Ctx:
    """What a case's setup and command line see."""

    t: Path  # the case's own directory
    shared: dict  # module-wide artefacts (a finished study), built once
    stack: contextlib.ExitStack  # held for the duration of the command (locks, mounts)

    def fmt(self, argv: str) -> list[str]:
        return shlex.split(argv.format(t=self.t, fashion=FASHION, py=sys.executable))


# ------------------------------------------------------------------------ setups: files
def _write(name: str, data: bytes) -> Callable[[Ctx], None]:
    def setup(c: Ctx) -> None:
        (c.t / name).write_bytes(data)
    return setup


def _text(name: str, text: str) -> Callable[[Ctx], None]:
    return _write(name, text.encode())


def _factory(c: Ctx) -> None:
    (c.t / "factory.py").write_text(FACTORY)


def _ckpt(c: Ctx, name: str, obj) -> None:
    _factory(c)
    torch.save(obj, c.t / name)


def _good_ckpt(c: Ctx) -> None:
    from bnlab.tools._factory import build_model

    _factory(c)
    _ckpt(c, "good.pt", build_model(f"{c.t}/factory.py:make").state_dict())


def _garbage(c: Ctx) -> None:
    _factory(c)
    (c.t / "ck.pt").write_bytes(b"not a checkpoint at all")


def _empty(c: Ctx) -> None:
    _factory(c)
    (c.t / "ck.pt").write_bytes(b"")


def _truncated(c: Ctx) -> None:
    _good_ckpt(c)
    (c.t / "ck.pt").write_bytes((c.t / "good.pt").read_bytes()[:200])


def _cut_in_half(c: Ctx) -> None:
    """``{t}/ck.pt``: the first half of a 47 KB state dict (torch.load: [Errno 22], no file)."""
    from bnlab.tools._factory import build_model

    _factory(c)
    torch.save(build_model(f"{c.t}/factory.py:wide").state_dict(), c.t / "wide.pt")
    data = (c.t / "wide.pt").read_bytes()
    (c.t / "ck.pt").write_bytes(data[: len(data) // 2])


def _nan_ckpt(c: Ctx) -> None:
    from bnlab.tools._factory import build_model

    _factory(c)
    sd = build_model(f"{c.t}/factory.py:make").state_dict()
    sd["1.running_var"][2] = float("nan")
    torch.save(sd, c.t / "nan.pt")


def _negative_var_ckpt(c: Ctx) -> None:
    from bnlab.tools._factory import build_model

    _factory(c)
    sd = build_model(f"{c.t}/factory.py:make").state_dict()
    sd["1.running_var"][1] = -5.0  # finite, but folds to NaN
    torch.save(sd, c.t / "neg.pt")


def _bad_syntax(c: Ctx) -> None:
    _good_ckpt(c)
    (c.t / "bad_syntax.py").write_text("import torch\n\ndef f(:\n    pass\n")


def _latin1_script(c: Ctx) -> None:
    (c.t / "latin.py").write_bytes("# caf\xe9\nx = 1\n".encode("latin-1"))


def _whole_model(c: Ctx) -> None:
    from bnlab.tools._factory import build_model

    _factory(c)
    torch.save(build_model(f"{c.t}/factory.py:make"), c.t / "ck.pt")  # pickles the class


def _misshaped(c: Ctx) -> None:
    from bnlab.tools._factory import build_model

    _factory(c)
    sd = build_model(f"{c.t}/factory.py:make").state_dict()
    sd["4.weight"] = torch.zeros(3, 99)
    torch.save(sd, c.t / "ck.pt")


def _other_model(c: Ctx) -> None:
    _ckpt(c, "ck.pt", nn.Linear(3, 2).state_dict())


def _a_list(c: Ctx) -> None:
    _ckpt(c, "ck.pt", [torch.ones(2)])


def _plain_file(c: Ctx) -> None:
    (c.t / "plain").write_text("x")


def _empty_dir(c: Ctx) -> None:
    (c.t / "empty").mkdir()


def _dir_ckpt(c: Ctx) -> None:
    _factory(c)
    (c.t / "ck.pt").mkdir()


def _both(*setups: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
    def setup(c: Ctx) -> None:
        for s in setups:
            s(c)
    return setup


# ------------------------------------------------------------------------ setups: datasets
def _data_dir(c: Ctx, replace: dict[str, Callable[[Path], None]] | None = None) -> Path:
    """``{t}/data``: Fashion-MNIST's four files linked, some replaced by ``replace[name](p)``."""
    d = c.t / "data"
    d.mkdir()
    for n in IDX_NAMES:
        p = d / f"{n}.gz"
        if replace and n in replace:
            replace[n](p)
        else:
            p.symlink_to(FASHION / f"{n}.gz")
    return d


def _fashion_minus_one(c: Ctx) -> None:
    _data_dir(c, {"t10k-labels-idx1-ubyte": lambda p: None})


def _dir_in_place(c: Ctx) -> None:
    _data_dir(c, {"train-labels-idx1-ubyte": lambda p: p.mkdir()})


def _broken_link(c: Ctx) -> None:
    _data_dir(c, {"train-labels-idx1-ubyte": lambda p: p.symlink_to(c.t / "nowhere.gz")})


def _float_labels(c: Ctx) -> None:
    # right shape, wrong element type: 10000 float32 labels (a float file trains to NaN)
    _data_dir(c, {"t10k-labels-idx1-ubyte": lambda p: write_idx(
        p, np.arange(10000, dtype=np.float32) % 10)})


def _labels_out_of_range(c: Ctx) -> None:
    _data_dir(c, {"t10k-labels-idx1-ubyte": lambda p: write_idx(
        p, (np.arange(10000) % 11).astype(np.uint8))})


def _truncated_gz(c: Ctx) -> None:
    _data_dir(c, {"t10k-labels-idx1-ubyte": lambda p: p.write_bytes(
        (FASHION / "t10k-labels-idx1-ubyte.gz").read_bytes()[:1000])})


def _overflowing_header(c: Ctx) -> None:
    # a label file claiming 2**32-1 x 2**32-1 x 2**32-1 entries: the product overflows int64
    raw = bytes([0, 0, 8, 3]) + struct.pack(">3I", *(0xFFFFFFFF,) * 3) + b"\x00" * 16
    _data_dir(c, {"t10k-labels-idx1-ubyte": lambda p: p.write_bytes(gzip.compress(raw))})


def _wrong_magic(c: Ctx) -> None:
    _data_dir(c, {"t10k-labels-idx1-ubyte": lambda p: p.write_bytes(
        gzip.compress(b"\x12\x34\x56\x78" + b"\x00" * 100))})


# ------------------------------------------------------------------------ setups: run dirs
def _run(c: Ctx) -> None:
    """``{t}/run``: a copy of a finished one-epoch run (config in ``{t}/run/config.toml``)."""
    shutil.copytree(c.shared["run"], c.t / "run")


def _study(c: Ctx) -> None:
    """``{t}/study``: a copy of a finished tiny ``bnlab run small-cnn`` study."""
    shutil.copytree(c.shared["study"], c.t / "study")


def _bitflip(c: Ctx) -> None:
    _run(c)
    p = c.t / "run" / "checkpoint.pt"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def _replace_ckpt(obj_or_bytes) -> Callable[[Ctx], None]:
    """Put a foreign checkpoint in the run with a matching digest (committed "by bnlab")."""
    def setup(c: Ctx) -> None:
        import hashlib

        _run(c)
        p = c.t / "run" / "checkpoint.pt"
        if isinstance(obj_or_bytes, bytes):
            p.write_bytes(obj_or_bytes)
        else:
            torch.save(obj_or_bytes, p)
        manifest = json.loads((c.t / "run" / "manifest.json").read_text())
        manifest["files"]["checkpoint.pt"] = {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                                              "bytes": p.stat().st_size}
        (c.t / "run" / "manifest.json").write_text(json.dumps(manifest))
    return setup


def _no_checkpoint(c: Ctx) -> None:
    _run(c)
    (c.t / "run" / "checkpoint.pt").unlink()


def _nothing_committed(c: Ctx) -> None:
    """A run whose checkpoint and manifest are gone, its rows left."""
    _no_checkpoint(c)
    (c.t / "run" / "manifest.json").unlink()


def _legacy(c: Ctx) -> None:
    """The run as bnlab wrote it before manifests: the digest beside the checkpoint."""
    import hashlib

    _run(c)
    (c.t / "run" / "manifest.json").unlink()
    digest = hashlib.sha256((c.t / "run" / "checkpoint.pt").read_bytes()).hexdigest()
    (c.t / "run" / "checkpoint.pt.sha256").write_text(f"{digest}  checkpoint.pt\n")


def _legacy_empty_digest(c: Ctx) -> None:
    _legacy(c)
    (c.t / "run" / "checkpoint.pt.sha256").write_text("")


def _legacy_lost_rows(c: Ctx) -> None:
    """Killed after checkpoint.pt, before steps.jsonl (bnlab before commits): rows lost."""
    _legacy(c)
    p = c.t / "run" / "steps.jsonl"
    p.write_text("".join(p.read_text().splitlines(keepends=True)[:1]))


def _foreign_dir(c: Ctx) -> None:
    (c.t / "r").mkdir()
    (c.t / "r" / "notes.txt").write_text("not a run")


def _empty_out(c: Ctx) -> None:
    (c.t / "r").mkdir()


def _locked(c: Ctx) -> None:
    _run(c)
    c.stack.enter_context(lock_run_dir(c.t / "run"))  # another writer holds it


def _bad_epochs(c: Ctx) -> None:
    _run(c)
    with (c.t / "run" / "epochs.jsonl").open("a") as f:
        f.write('{"epoch": 1, "val_acc": \n')


def _epochs_lack_key(c: Ctx) -> None:
    _run(c)
    p = c.t / "run" / "epochs.jsonl"
    rows = [json.loads(line) for line in p.read_text().splitlines()]
    del rows[0]["epoch_time"]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _bad_config(c: Ctx) -> None:
    _run(c)
    (c.t / "run" / "config.toml").write_text("epochs = [unclosed\n")


def _nan_config(c: Ctx) -> None:
    (c.t / "c.toml").write_text("momentum = nan\n")


def _tmpfs(c: Ctx) -> None:
    """``{t}/full``: a 64 KiB tmpfs, already full."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = c.t / "full"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("this machine does not let the test mount a tmpfs")
    c.stack.callback(subprocess.run, ["umount", "-l", str(mnt)], check=False)
    with contextlib.suppress(OSError):
        (mnt / "filler").write_bytes(b"\0" * (1 << 20))


def _tmpfs_study(c: Ctx) -> None:
    _study(c)
    _tmpfs(c)


def _tmpfs_ckpt(c: Ctx) -> None:
    _good_ckpt(c)
    _tmpfs(c)


# ------------------------------------------------------------------------ the table
# The trained run's own flags: `train --config {t}/run/config.toml` reproduces its config.
SAME = "train --out {t}/run --resume --config {t}/run/config.toml --quiet"
FACT = "--model {t}/factory.py:make"


@dataclass(frozen=True)
class Case:
    id: str
    argv: str
    code: int
    phrase: str
    setup: Callable[[Ctx], None] | None = None
    needs: str = ""  # "fashion": needs Debian's dataset-fashion-mnist; "run"/"study": a run


CASES = [
    # --- settings: each refused before anything is created
    Case("set-momentum-nan", "train --out {t}/r --set momentum=nan", 2,
         "momentum must be a float in [0, 1), got nan"),
    Case("set-gamma-nan", "train --out {t}/r --set gamma=nan", 2, "gamma"),
    Case("set-weight-decay-nan", "train --out {t}/r --set weight_decay=nan", 2,
         "weight_decay must be a finite float >= 0, got nan"),
    Case("set-lr-inf", "train --out {t}/r --set lr=inf", 2, "lr must be a positive finite"),
    Case("set-lr-negative", "train --out {t}/r --set lr=-1", 2, "lr must be a positive"),
    Case("set-threads-huge", "train --out {t}/r --set threads=100000", 2,
         "threads must be at most"),
    Case("set-epochs-zero", "train --out {t}/r --set epochs=0", 2, "epochs must be >= 1, got 0"),
    Case("set-epochs-float", "train --out {t}/r --set epochs=1.5", 2,
         "--set epochs: expected int, got '1.5'"),
    Case("set-unknown-key", "train --out {t}/r --set steps=abc", 2, "unknown key 'steps'"),
    Case("set-no-equals", "train --out {t}/r --set lr", 2, "--set expects KEY=VALUE, got 'lr'"),
    Case("set-bool", "train --out {t}/r --set monitor=maybe", 2,
         "--set monitor: expected true or false"),
    Case("set-batch-size-zero", "train --out {t}/r --set batch_size=0", 2,
         "batch_size must be >= 1"),
    Case("unknown-model", "train --out {t}/r --model nosuch", 2, "unknown model 'nosuch'"),
    Case("unknown-norm", "train --out {t}/r --norm nosuch", 2, "unknown normaliser 'nosuch'"),
    Case("unknown-dataset", "train --out {t}/r --dataset nosuch", 2, "dataset must be one of"),
    Case("model-dataset-mismatch", "train --out {t}/r --dataset mnist1d", 2,
         "does not take 'mnist1d' inputs"),
    Case("sync-bn-one-process", "train --out {t}/r --sync-bn", 2,
         "sync_bn needs nproc_per_node > 1"),
    Case("nproc-zero", "train --out {t}/r --nproc-per-node 0", 2, "nproc_per_node must be >= 1"),
    Case("dist-timeout-negative", "train --out {t}/r --dist-timeout -1", 2,
         "--dist-timeout must be a positive number of seconds, got -1"),
    Case("dist-timeout-nan", "train --out {t}/r --dist-timeout nan", 2,
         "--dist-timeout must be a positive number of seconds, got nan"),
    Case("epochs-not-int", "train --out {t}/r --epochs abc", 2,
         "argument --epochs: invalid int value: 'abc'"),
    Case("config-missing", "train --out {t}/r --config {t}/nosuch.toml", 2, "nosuch.toml"),
    Case("config-is-dir", "train --out {t}/r --config {t}", 2, "Is a directory"),
    Case("config-not-toml", "train --out {t}/r --config {t}/c.toml", 2,
         "c.toml: not a TOML file", _text("c.toml", "epochs = [unclosed\n")),
    Case("config-table", "train --out {t}/r --config {t}/c.toml", 2,
         "tables are not config keys: opt", _text("c.toml", "[opt]\nlr = 1\n")),
    Case("config-unknown-key", "train --out {t}/r --config {t}/c.toml", 2,
         "unknown key(s) steps", _text("c.toml", "steps = 3\n")),
    Case("config-nan", "train --out {t}/r --config {t}/c.toml", 2,
         "momentum must be a float in [0, 1), got nan", _nan_config),
    Case("config-wrong-type", "train --out {t}/r --config {t}/c.toml", 2,
         "epochs must be int, got '3'", _text("c.toml", 'epochs = "3"\n')),
    # --- run directories (--out)
    Case("train-out-is-file", "train --out {t}/plain --set epochs=1", 2, "plain",
         _plain_file),
    Case("train-out-under-file", "train --out {t}/plain/sub --set epochs=1", 2, "plain",
         _plain_file),
    Case("train-out-holds-run", "train --out {t}/run --config {t}/run/config.toml --quiet", 2,
         "already holds a run; pass --resume", _run, "run"),
    Case("train-locked", "train --out {t}/run --resume --config {t}/run/config.toml", 2,
         "is being written by another bnlab run (pid", _locked, "run"),
    Case("resume-changed-epochs", SAME + " --epochs 2", 2, "epochs", _run, "run"),
    Case("resume-changed-norm", SAME + " --norm bn", 2, "norm", _run, "run"),
    Case("resume-changed-lr", SAME + " --set lr=0.01", 2, "lr", _run, "run"),
    Case("resume-bit-flipped", SAME, 2, "differs from", _bitflip, "run"),
    Case("resume-empty-checkpoint", SAME, 2, "checkpoint.pt: empty file", _replace_ckpt(b""),
         "run"),
    Case("resume-foreign-checkpoint", SAME, 2, "checkpoint.pt: not a bnlab training checkpoint",
         _replace_ckpt({"weights": torch.ones(3)}), "run"),
    Case("resume-whole-model", SAME, 2, "checkpoint.pt: not a readable bnlab checkpoint (not "
         "a file of tensors: Unsupported global: GLOBAL torch.nn.modules.linear.Linear)",
         _replace_ckpt(nn.Linear(2, 2)), "run"),
    Case("resume-out-missing", "train --out {t}/r --resume --quiet", 2,
         "--resume: {t}/r does not exist, so there is no run to resume; check --out"),
    Case("resume-empty-dir", "train --out {t}/r --resume --quiet", 2,
         "--resume: {t}/r holds no run (it is empty)", _empty_out),
    Case("resume-foreign-dir", "train --out {t}/r --resume --quiet", 2,
         "--resume: {t}/r is not a bnlab run directory (no config.toml; it holds notes.txt)",
         _foreign_dir),
    Case("resume-checkpoint-deleted", SAME, 2,
         "checkpoint.pt is missing, but manifest.json records it", _no_checkpoint, "run"),
    Case("resume-nothing-committed", SAME, 2,
         "has no checkpoint.pt, but 1 epoch(s) and 2 step(s) of the run were written",
         _nothing_committed, "run"),
    Case("resume-finished", SAME, 0, "the run is complete (1 epochs); nothing to resume, "
         "nothing retrained", _run, "run"),
    Case("resume-legacy-finished", SAME, 0, "the run is complete", _legacy, "run"),
    Case("resume-legacy-empty-digest", SAME, 2,
         "checkpoint.pt.sha256 is empty, not the SHA-256 of checkpoint.pt; if the checkpoint is "
         "intact, delete checkpoint.pt.sha256", _legacy_empty_digest, "run"),
    Case("resume-legacy-lost-rows", SAME, 2, "steps.jsonl: the checkpoint is at step 2, but the "
         "file holds rows for 1 of steps 0..1 (step 1 is the first missing)", _legacy_lost_rows,
         "run"),
    Case("resume-other-config", SAME, 2, "checkpoint.pt was written for another config",
         _replace_ckpt({"model": {}, "optimizer": {}, "rng": torch.zeros(1, dtype=torch.uint8),
                        "epoch": 0, "step_in_epoch": 0, "step": 0, "accumulators": {},
                        "config": {"epochs": 99}}), "run"),
    # --- datasets
    Case("fashion-called-mnist", "train --out {t}/r --dataset mnist --data-dir {fashion}", 2,
         "holds fashion-mnist's files, not mnist's", None, "fashion"),
    Case("data-dir-missing-file", "train --out {t}/r --data-dir {t}/data", 2,
         "lacks t10k-labels-idx1-ubyte", _fashion_minus_one, "fashion"),
    Case("data-dir-holds-dir", "train --out {t}/r --data-dir {t}/data", 2,
         "train-labels-idx1-ubyte.gz is a directory", _dir_in_place, "fashion"),
    Case("data-dir-broken-link", "train --out {t}/r --data-dir {t}/data", 2,
         "train-labels-idx1-ubyte.gz is a broken link", _broken_link, "fashion"),
    Case("data-dir-nonexistent", "train --out {t}/r --data-dir {t}/nowhere", 2,
         "--data-dir", None, "fashion"),
    Case("data-dir-empty", "train --out {t}/r --data-dir {t}/empty", 2,
         "--data-dir {t}/empty holds none of fashion-mnist's files", _empty_dir),
    Case("data-dir-is-file", "train --out {t}/r --data-dir {t}/plain", 2,
         "--data-dir {t}/plain is not a directory", _plain_file),
    Case("data-float-idx", "train --out {t}/r --dataset mnist --data-dir {t}/data", 2,
         "IDX elements of type float32", _float_labels, "fashion"),
    Case("data-labels-out-of-range", "train --out {t}/r --dataset mnist --data-dir {t}/data",
         2, "labels outside 0..9", _labels_out_of_range, "fashion"),
    Case("data-truncated-gz", "train --out {t}/r --dataset mnist --data-dir {t}/data", 2,
         "truncated or corrupt gzip", _truncated_gz, "fashion"),
    Case("verify-overflowing-header", "data verify fashion-mnist --data-dir {t}/data", 1,
         "corrupt header: it claims shape", _overflowing_header, "fashion"),
    Case("verify-wrong-magic", "data verify fashion-mnist --data-dir {t}/data", 1,
         "bad IDX magic number", _wrong_magic, "fashion"),
    Case("verify-labels-out-of-range", "data verify fashion-mnist --data-dir {t}/data", 1,
         "labels outside 0..9", _labels_out_of_range, "fashion"),
    Case("verify-fashion-as-mnist", "data verify mnist --data-dir {fashion}", 1,
         "holds fashion-mnist's files, not mnist's", None, "fashion"),
    Case("verify-data-dir-missing", "data verify --data-dir {t}/nowhere", 2,
         "--data-dir {t}/nowhere does not exist"),
    Case("verify-data-dir-empty", "data verify --data-dir {t}/empty", 1,
         "--data-dir {t}/empty holds none of", _empty_dir),
    Case("list-data-dir-file", "data list --data-dir {t}/plain", 2,
         "--data-dir {t}/plain is not a directory", _plain_file),
    Case("list-data-dir-missing", "data list --data-dir {t}/nowhere", 2,
         "--data-dir {t}/nowhere does not exist"),
    Case("verify-unknown-name", "data verify nosuch", 2, "unknown dataset 'nosuch'"),
    # --- bnlab run small-cnn
    Case("cnn-seeds-zero", "run small-cnn --out {t}/s --seeds 0 " + TINY_CNN, 2,
         "--seeds must be >= 1, got 0", None, "fashion"),
    Case("cnn-unknown-norm", "run small-cnn --out {t}/s --norms none,nosuch", 2,
         "unknown normaliser 'nosuch'", None, "fashion"),
    Case("cnn-no-norms", "run small-cnn --out {t}/s --norms ,", 2,
         "--norms must name at least one normaliser", None, "fashion"),
    Case("cnn-lr-nan", "run small-cnn --out {t}/s --lr nan", 2, "lr must be a positive finite",
         None, "fashion"),
    Case("cnn-out-is-file", "run small-cnn --out {t}/plain " + TINY_CNN, 2, "plain",
         _plain_file, "fashion"),
    Case("cnn-out-under-file", "run small-cnn --out {t}/plain/sub " + TINY_CNN, 2, "plain",
         _plain_file, "fashion"),
    Case("cnn-out-holds-study", "run small-cnn --out {t}/study " + TINY_CNN, 2,
         "already holds a study; pass --resume", _study, "study"),
    Case("cnn-resume-epochs", "run small-cnn --out {t}/study --resume " +
         TINY_CNN.replace("--epochs 1", "--epochs 3"), 2, "epochs (was 1, now 3)", _study,
         "study"),
    Case("cnn-resume-norms", "run small-cnn --out {t}/study --resume " +
         TINY_CNN.replace("--norms none", "--norms none,bn"), 2, "norms (was ['none'], now",
         _study, "study"),
    Case("cnn-resume-lr", "run small-cnn --out {t}/study --resume --lr 0.1 " + TINY_CNN, 2,
         "lr (was 0.001, now 0.1)", _study, "study"),
    Case("cnn-resume-batch", "run small-cnn --out {t}/study --resume " +
         TINY_CNN.replace("--batch-size 16", "--batch-size 8"), 2,
         "batch_size (was 16, now 8)", _study, "study"),
    # --- bnlab fold
    Case("fold-garbage", "fold {t}/ck.pt " + FACT, 2, "ck.pt: not a state-dict checkpoint "
         "torch.load(weights_only=True) can read (not a file of tensors", _garbage),
    Case("fold-empty", "fold {t}/ck.pt " + FACT, 2, "ck.pt: empty file", _empty),
    Case("fold-truncated", "fold {t}/ck.pt " + FACT, 2, "(truncated or damaged", _truncated),
    Case("fold-whole-model", "fold {t}/ck.pt " + FACT, 2,
         "a whole pickled model, not a state dict", _whole_model),
    Case("fold-misshaped", "fold {t}/ck.pt " + FACT, 2,
         "ck.pt does not fit", _misshaped),
    Case("fold-other-model", "fold {t}/ck.pt " + FACT, 2, "ck.pt does not fit", _other_model),
    Case("fold-not-a-dict", "fold {t}/ck.pt " + FACT, 2, "expected a state dict", _a_list),
    Case("fold-missing", "fold {t}/nosuch.pt " + FACT, 2, "nosuch.pt", _factory),
    Case("fold-directory", "fold {t}/ck.pt " + FACT, 2, "ck.pt: Is a directory", _dir_ckpt),
    Case("fold-out-is-input", "fold {t}/good.pt " + FACT + " --out {t}/good.pt", 2,
         "is the input checkpoint", _good_ckpt),
    Case("fold-out-under-file", "fold {t}/good.pt " + FACT + " --out {t}/plain/x.pt", 2,
         "plain/x.pt: Not a directory (writing x.pt", _both(_good_ckpt, _plain_file)),
    Case("fold-out-disk-full", "fold {t}/good.pt " + FACT + " --out {t}/full/x.pt", 2,
         "No space left on device", _tmpfs_ckpt),
    Case("fold-unknown-module", "fold {t}/good.pt --model nosuch_pkg:make", 2,
         "cannot import 'nosuch_pkg'", _good_ckpt),
    Case("fold-bad-factory-spec", "fold {t}/good.pt --model make", 2,
         "must look like 'module:callable'", _good_ckpt),
    Case("fold-factory-not-module", "fold {t}/good.pt --model {t}/factory.py:not_a_module", 2,
         "must return an nn.Module, got int", _good_ckpt),
    Case("fold-bad-shape", "fold {t}/good.pt " + FACT + " --example-shape 1,x", 2,
         "--example-shape must be comma-separated sizes", _good_ckpt),
    Case("fold-wrong-shape", "fold {t}/good.pt " + FACT + " --example-shape 1,3,6,6", 2,
         "--example-shape (1, 3, 6, 6) does not fit", _good_ckpt),
    Case("fold-factory-syntax-error", "fold {t}/good.pt --model {t}/bad_syntax.py:f", 2,
         "bad_syntax.py, line 3: invalid syntax", _bad_syntax),
    Case("fold-factory-raises", "fold {t}/good.pt --model {t}/factory.py:raises", 2,
         "raised AttributeError: module 'torch.nn' has no attribute 'Nope'", _good_ckpt),
    Case("fold-cut-in-half", "fold {t}/ck.pt --model {t}/factory.py:wide", 2,
         "ck.pt: not a state-dict checkpoint torch.load(weights_only=True) can read "
         "(truncated or damaged", _cut_in_half),
    Case("fold-nan-statistics", "fold {t}/nan.pt " + FACT, 2,
         "1.running_var holds non-finite values", _nan_ckpt),
    Case("fold-negative-variance", "fold {t}/neg.pt " + FACT, 2,
         "running_var holds 1 negative of 4 values", _negative_var_ckpt),
    Case("fold-empty-batch", "fold {t}/good.pt " + FACT + " --example-shape 0,1,6,6", 2,
         "--example-shape 0,1,6,6: every size must be >= 1", _good_ckpt),
    # --- bnlab lint
    Case("lint-cut-in-half", "lint {t}/factory.py:wide --checkpoint {t}/ck.pt", 2,
         "ck.pt: not a state-dict checkpoint torch.load(weights_only=True) can read "
         "(truncated or damaged", _cut_in_half),
    Case("lint-factory-syntax-error", "lint {t}/bad_syntax.py:f", 2,
         "bad_syntax.py, line 3: invalid syntax", _bad_syntax),
    Case("lint-factory-raises", "lint {t}/factory.py:raises", 2,
         "raised AttributeError", _factory),
    Case("lint-script-not-utf8", "lint {t}/latin.py", 2,
         "latin.py: not UTF-8 text", _latin1_script),
    Case("lint-garbage", "lint {t}/factory.py:make --checkpoint {t}/ck.pt", 2,
         "ck.pt: not a state-dict checkpoint", _garbage),
    Case("lint-truncated", "lint {t}/factory.py:make --checkpoint {t}/ck.pt", 2,
         "ck.pt: not a state-dict checkpoint", _truncated),
    Case("lint-whole-model", "lint {t}/factory.py:make --checkpoint {t}/ck.pt", 2,
         "a whole pickled model, not a state dict", _whole_model),
    Case("lint-misshaped", "lint {t}/factory.py:make --checkpoint {t}/ck.pt", 2,
         "ck.pt does not fit", _misshaped),
    Case("lint-unknown-module", "lint nosuch_pkg:make", 2, "cannot import 'nosuch_pkg'"),
    Case("lint-wrong-shape", "lint {t}/factory.py:make --example-shape 2,3,6,6", 2,
         "--example-shape (2, 3, 6, 6) does not fit", _factory),
    Case("lint-no-callable", "lint make", 2, "must look like 'module:callable'"),
    Case("lint-missing-script", "lint {t}/nosuch.py", 2, "nosuch.py' does not exist"),
    Case("lint-script-with-shape", "lint {t}/factory.py --example-shape 2,1,6,6", 2,
         "need a model", _factory),
    Case("lint-script-not-python", "lint {t}/broken.py", 2, "broken.py is not valid Python",
         lambda c: (c.t / "broken.py").write_text("def f(:\n")),
    # --- bnlab report
    Case("report-missing", "report {t}/nosuch", 2, "nosuch: no such run directory"),
    Case("report-no-runs", "report {t}", 2, "no run directories"),
    Case("report-out-is-file", "report {t}/study --out {t}/plain", 2, "plain", _both(
        _study, _plain_file), "study"),
    Case("report-out-under-file", "report {t}/study --out {t}/plain/sub", 2, "plain",
         _both(_study, _plain_file), "study"),
    Case("report-disk-full", "report {t}/study --out {t}/full", 2, "No space left on device",
         _tmpfs_study, "study"),
    Case("report-bad-epochs", "report {t}/run", 2, "epochs.jsonl: line 2 is not JSON",
         _bad_epochs, "run"),
    Case("report-epoch-lacks-key", "report {t}/run", 2,
         "epochs.jsonl: line 1 lacks 'epoch_time'", _epochs_lack_key, "run"),
    Case("report-bad-config", "report {t}/run", 2, "config.toml: not a TOML file", _bad_config,
         "run"),
    # --- bnlab study
    Case("study-unknown", "study run nosuch --out {t}", 2, "unknown study 'nosuch'"),
    Case("study-seeds-zero", "study run shift --seeds 0 --out {t}", 2,
         "--seeds must be >= 1, got 0"),
    Case("study-set-not-int", "study run running-stats --set steps=abc --out {t}", 2,
         "--set steps: expected int, got 'abc'"),
    Case("study-set-unknown", "study run shift --set nosuch=1 --out {t}", 2,
         "unknown setting 'nosuch'"),
    Case("study-set-no-equals", "study run running-stats --set steps --out {t}", 2,
         "--set expects KEY=VALUE, got 'steps'"),
    Case("study-report-missing", "study report {t}/nosuch", 2, "nosuch"),
    Case("study-table-empty", "study table {t}", 2, "no study run directories"),
]  # fmt: skip


# ------------------------------------------------------------------------ shared artefacts
@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A tiny finished ``bnlab run small-cnn`` study (Fashion-MNIST, 32 examples, one epoch) and
    its one run directory; built lazily, once, by the cases that need them."""
    made: dict = {}

    def get(key: str) -> dict:
        if key in ("run", "study") and "study" not in made:
            if not HAVE_FASHION:
                pytest.skip("needs Debian's dataset-fashion-mnist")
            out = tmp_path_factory.mktemp("shared") / "study"
            assert main(["run", "small-cnn", "--out", str(out), *shlex.split(TINY_CNN)]) == 0
            made["study"] = out
            made["run"] = out / "runs" / "none-s0"
        if key == "fashion" and not HAVE_FASHION:
            pytest.skip("needs Debian's dataset-fashion-mnist")
        return made

    return get


def _no_training(*args, **kwargs):
    raise AssertionError("the case reached training: the mistake went unnoticed")


def _run_case(case: Case, tmp_path: Path, shared, capsys, monkeypatch
              ) -> tuple[int, str, str]:
    with contextlib.ExitStack() as stack:
        made = shared(case.needs) if case.needs else {}
        c = Ctx(tmp_path, made, stack)
        if case.setup is not None:
            case.setup(c)
        capsys.readouterr()
        monkeypatch.setattr("bnlab.lab.train.loop.build_net", _no_training)
        try:
            rc = main(c.fmt(case.argv))
        except SystemExit as e:  # argparse's own errors
            rc = e.code
        out = capsys.readouterr()
    return rc, out.out, out.err


def test_the_table_has_enough_distinct_cases():
    assert len({c.id for c in CASES}) == len(CASES) >= 60
    assert len({c.argv + str(c.setup) for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_mistake_gives_one_line(case, tmp_path, shared, capsys, monkeypatch):
    rc, out, err = _run_case(case, tmp_path, shared, capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert "Traceback" not in err + out
    assert len(lines) == 1, f"not one line on stderr:\n{err}"
    assert rc == case.code, f"exit {rc}, expected {case.code}: {err}"
    phrase = case.phrase.replace("{t}", str(tmp_path))
    assert phrase in lines[0], f"{phrase!r} not in {lines[0]!r}"
    assert lines[0].startswith("bnlab") or case.code == 0, lines[0]  # 0: a notice


@pytest.mark.parametrize("case", [c for c in CASES if " --out {t}/r " in c.argv + " "],
                         ids=lambda c: c.id)
def test_a_refused_train_leaves_no_out_directory(case, tmp_path, shared, capsys, monkeypatch):
    """A mistake found after --out was created (a data directory) removes what it created:
    no folder holding only a .lock is left behind, and a folder that was there is as it was."""
    before = []

    def listing() -> list[str]:
        return sorted(p.name for p in (tmp_path / "r").iterdir())

    def setup(c: Ctx) -> None:
        if case.setup is not None:
            case.setup(c)
        if (c.t / "r").exists():
            before.append(listing())

    rc, _, _ = _run_case(replace(case, setup=setup), tmp_path, shared, capsys, monkeypatch)
    assert rc == 2
    if before:
        assert listing() == before[0]
    else:
        assert not (tmp_path / "r").exists(), listing()


def test_a_failed_report_leaves_no_partial_file(tmp_path, shared, capsys):
    case = next(c for c in CASES if c.id == "report-disk-full")
    with contextlib.ExitStack() as stack:
        c = Ctx(tmp_path, shared("study"), stack)
        case.setup(c)
        assert main(c.fmt(case.argv)) == 2
        left = sorted(str(p.relative_to(c.t / "full")) for p in (c.t / "full").rglob("*"))
    assert all(not n.startswith(".") and "tmp" not in n for n in left), left
    assert not any(n.endswith((".png", ".md", ".html")) for n in left), left


def test_the_written_config_is_refused_again_when_edited_to_nan(tmp_path, shared, capsys):
    """A config.toml written by bnlab is TOML (tomli-w); editing a NaN into it is refused."""
    import tomllib

    c = Ctx(tmp_path, shared("run"), contextlib.ExitStack())
    _run(c)
    text = (c.t / "run" / "config.toml").read_text()
    assert tomllib.loads(text)["momentum"] == 0.9
    (c.t / "run" / "config.toml").write_text(text.replace("momentum = 0.9", "momentum = nan"))
    assert main(c.fmt(SAME)) == 2
    assert "momentum must be a float in [0, 1), got nan" in capsys.readouterr().err


# ------------------------------------------------------------------------ a real terminal
SUBPROCESS = ["set-momentum-nan", "fold-garbage", "study-unknown", "epochs-not-int"]


@pytest.mark.parametrize("case_id", SUBPROCESS)
def test_no_traceback_reaches_a_terminal(case_id, tmp_path, shared):
    case = next(c for c in CASES if c.id == case_id)
    with contextlib.ExitStack() as stack:
        c = Ctx(tmp_path, {}, stack)
        if case.setup is not None:
            case.setup(c)
        r = subprocess.run([sys.executable, "-m", "bnlab", *c.fmt(case.argv)],
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "BNLAB_DEBUG": ""})
    assert r.returncode == case.code
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and case.phrase in r.stderr, r.stderr


def test_debug_shows_the_traceback(tmp_path):
    from bnlab.lab.train.rundir import RunLockedError

    with lock_run_dir(tmp_path), pytest.raises(RunLockedError, match="being written"):
        main(["--debug", "train", "--out", str(tmp_path), "--set", "epochs=1",
              "--set", "dataset=mnist1d", "--set", "model=mnist1d_mlp"])  # fmt: skip
