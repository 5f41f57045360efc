"""The command line end to end on real Fashion-MNIST (small subsets, one epoch)."""

from __future__ import annotations

import json

import pytest

from bnlab.lab.cli import main
from bnlab.lab.report import write_report
from bnlab.lab.train import TrainConfig, read_jsonl


@pytest.fixture(scope="module")
def seed_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "small-cnn"
    rc = main(["run", "small-cnn", "--dataset", "fashion-mnist", "--epochs", "1", "--norms",
               "none,bn", "--seeds", "2", "--train-subset", "1024", "--test-subset", "500",
               "--threads", "2", "--out", str(out), "--quiet"])
    assert rc == 0
    return out


def test_run_small_cnn_writes_runs_and_report(seed_study, capsys):
    runs = sorted(p.name for p in (seed_study / "runs").iterdir())
    assert runs == ["bn-s0", "bn-s1", "none-s0", "none-s1"]
    for r in runs:
        cfg = TrainConfig.from_toml(seed_study / "runs" / r / "config.toml")
        assert (cfg.model, cfg.dataset, cfg.train_subset, cfg.epochs) == (
            "small_cnn", "fashion-mnist", 1024, 1)
        assert len(read_jsonl(seed_study / "runs" / r / "steps.jsonl")) == 8
    md = (seed_study / "report.md").read_text()
    assert "| none | 2 | 1 |" in md and "| bn | 2 | 1 |" in md
    assert "In this run BN " in md
    study = json.loads((seed_study / "study.json").read_text())
    assert study["norms"] == ["none", "bn"] and study["train_examples"] == 1024


def test_report_is_regenerated_from_run_dirs_only(seed_study, tmp_path, capsys):
    before = (seed_study / "report.md").read_text()
    (seed_study / "report.md").unlink()
    assert main(["report", str(seed_study)]) == 0
    assert (seed_study / "report.md").read_text() == before
    # A run's numbers changed on disk change the report: nothing is cached or typed in.
    run = seed_study / "runs" / "bn-s0"
    original = (run / "epochs.jsonl").read_text()
    rec = json.loads(original)
    rec["val_acc"] = 0.123456
    (run / "epochs.jsonl").write_text(json.dumps(rec) + "\n")
    try:
        write_report([run], tmp_path)
        assert "12.35" in (tmp_path / "report.md").read_text()
    finally:
        (run / "epochs.jsonl").write_text(original)


def test_existing_study_needs_resume_also_under_the_old_name(seed_study, capsys):
    # `bnlab run seed` is the old name of `bnlab run small-cnn`: it runs, with a one-line note
    args = ["run", "seed", "--dataset", "fashion-mnist", "--epochs", "1", "--norms", "none",
            "--train-subset", "1024", "--out", str(seed_study), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("bnlab: note: `bnlab run seed` is now `bnlab run small-cnn`; the old name "
                      "still works")
    assert len(err) == 2 and "pass --resume" in err[1]


def test_unknown_norm_fails_before_training(tmp_path, capsys):
    rc = main(["run", "small-cnn", "--dataset", "fashion-mnist", "--norms", "none,bogus",
               "--out", str(tmp_path / "x"), "--quiet"])
    assert rc == 2
    assert "unknown normaliser 'bogus'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_train_command_with_toml_and_set(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('model = "mnist1d_cnn"\ndataset = "mnist1d"\nnorm = "bn"\nepochs = 1\n')
    out = tmp_path / "run"
    rc = main(["train", "--config", str(cfg), "--set", "batch_size=100", "--set",
               "train_subset=400", "--out", str(out), "--quiet"])
    assert rc == 0
    saved = TrainConfig.from_toml(out / "config.toml")
    assert (saved.model, saved.batch_size, saved.train_subset) == ("mnist1d_cnn", 100, 400)
    assert len(read_jsonl(out / "steps.jsonl")) == 4
    assert main(["train", "--config", str(cfg), "--set", "bogus=1"]) == 2
    assert "unknown key 'bogus'" in capsys.readouterr().err


def test_data_commands(capsys):
    assert main(["data", "list"]) == 0
    assert "fashion-mnist  found in" in capsys.readouterr().out
    assert main(["data", "verify", "fashion-mnist"]) == 0
    assert capsys.readouterr().out.count("OK ") == 4
    assert main(["data", "verify", "cifar"]) == 2


def test_demo_defaults_and_full_flag():
    from bnlab.lab.cli import build_parser

    args = build_parser().parse_args(["demo"])
    assert (args.dataset, args.epochs, args.seeds, args.train_subset) == (
        "fashion-mnist", 3, 2, 30000)
    assert args.norms == "none,bn,bn-window,bn-running"
    assert build_parser().parse_args(["demo", "--full"]).full


def test_resume_with_changed_settings_is_refused_naming_them(tmp_path):
    from bnlab.lab.train.rundir import write_json
    from bnlab.lab.train.study import SmallCNNStudy, run_small_cnn_study

    started = SmallCNNStudy(dataset="fashion-mnist", epochs=2,
                            norms=("none", "bn"), seeds=1, train_subset=256, test_subset=64)
    asked = {k: (list(v) if isinstance(v, tuple) else v) for k, v in started.__dict__.items()}
    write_json(tmp_path / "study.json", {"dataset": "fashion-mnist", "study": asked})
    changed = SmallCNNStudy(dataset="fashion-mnist", epochs=3, norms=("none", "bn", "gn"),
                            seeds=1, train_subset=256, test_subset=64)
    with pytest.raises(ValueError, match=r"epochs \(was 2, now 3\); norms \(was \['none', "
                                         r"'bn'\], now \['none', 'bn', 'gn'\]\)"):
        run_small_cnn_study(changed, tmp_path, resume=True)
    assert not (tmp_path / "runs").exists()  # nothing trained
