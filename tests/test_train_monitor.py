"""BN monitoring inside training runs: monitor.jsonl in the run directory, drawn in the report."""

from __future__ import annotations

import math
import signal

import pytest
import torch

from bnlab.lab.cli import main
from bnlab.lab.data import Dataset
from bnlab.lab.train import TrainConfig, load_checkpoint, parse_overrides, read_jsonl, train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 1-epoch runs of the seed CNN on 256 real Fashion-MNIST images (4 steps of 64):
    one with ``--monitor --monitor-every 2``, one without."""
    root = tmp_path_factory.mktemp("monitor")
    common = ["train", "--dataset", "fashion-mnist", "--epochs", "1", "--quiet",
              "--set", "train_subset=256", "--set", "test_subset=128",
              "--set", "batch_size=64", "--set", "threads=1"]
    assert main([*common, "--monitor", "--monitor-every", "2", "--out", str(root / "mon")]) == 0
    assert main([*common, "--out", str(root / "plain")]) == 0
    return root / "mon", root / "plain"


def test_monitored_run_records_both_bn_layers(runs, capsys):
    mon, plain = runs
    rows = read_jsonl(mon / "monitor.jsonl")
    assert not (plain / "monitor.jsonl").exists()
    # the seed CNN's two BN layers are modules 2 and 6; steps 0 and 2 of 4 are recorded
    assert sorted((r["step"], r["layer"]) for r in rows) == [(0, "2"), (0, "6"), (2, "2"),
                                                             (2, "6")]
    for r in rows:
        assert r["epoch"] == 0 and r["training"] is True
        assert r["out_p15"] < r["out_p50"] < r["out_p85"]
        assert r["in_p15"] <= r["in_p50"] <= r["in_p85"]
        for key in ("grad_in_norm", "grad_out_norm", "drift_mean", "drift_var", "gamma_mean",
                    "beta_std", "in_std", "out_std"):
            assert math.isfinite(r[key]), key
        assert r["grad_in_norm"] > 0 and r["grad_out_norm"] > 0
    # BN after ReLU: the layer's input is non-negative, its output is centred
    assert all(r["in_p15"] >= 0 for r in rows)
    assert all(abs(r["out_mean"]) < 0.2 for r in rows if r["step"] == 0)
    # gamma starts at 1, beta at 0 (before the first step's update)
    first = [r for r in rows if r["step"] == 0]
    assert all(r["gamma_mean"] == 1.0 and r["beta_max"] == 0.0 for r in first)


def test_monitoring_does_not_change_training(runs):
    mon, plain = runs
    a, b = load_checkpoint(mon)["model"], load_checkpoint(plain)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in r.items() if k != "time"} for r in read_jsonl(mon / "steps.jsonl")]
    assert strip == [{k: v for k, v in r.items() if k != "time"}
                     for r in read_jsonl(plain / "steps.jsonl")]


def test_report_draws_the_monitor_figure_only_when_recorded(runs, tmp_path, capsys):
    mon, plain = runs
    assert main(["report", str(mon), "--out", str(tmp_path / "m")]) == 0
    assert main(["report", str(plain), "--out", str(tmp_path / "p")]) == 0
    page = (tmp_path / "m" / "report.html").read_text()
    assert 'id="fig-monitor"' in page and "data:image/png;base64," in page
    assert (tmp_path / "m" / "report-files" / "monitor.png").stat().st_size > 1000
    assert "report-files/monitor.png" in (tmp_path / "m" / "report.md").read_text()
    assert 'id="fig-monitor"' not in (tmp_path / "p" / "report.html").read_text()


def _synthetic(n_train=160, n_test=64) -> Dataset:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    x = torch.rand(n_train + n_test, 1, 28, 28, generator=g)
    return Dataset("synthetic", x[:n_train], y[:n_train], x[n_train:], y[n_train:], "test")


def test_monitor_rows_survive_ctrl_c_and_resume(tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=32, monitor=True, monitor_every=3, threads=1)
    train(cfg, tmp_path / "ref", dataset=_synthetic())

    def interrupt(step):
        if step == 7:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", dataset=_synthetic(), on_step=interrupt)
    assert {r["step"] for r in read_jsonl(tmp_path / "cut" / "monitor.jsonl")} == {0, 3, 6}
    train(cfg, tmp_path / "cut", dataset=_synthetic(), resume=True)
    ref = read_jsonl(tmp_path / "ref" / "monitor.jsonl")
    assert {r["step"] for r in ref} == {0, 3, 6, 9}
    assert read_jsonl(tmp_path / "cut" / "monitor.jsonl") == ref


def test_monitor_config_validation():
    assert parse_overrides(["monitor=true", "monitor_every=5"]) == {"monitor": True,
                                                                    "monitor_every": 5}
    with pytest.raises(ValueError, match="--set monitor: expected true or false, got 'yes'"):
        parse_overrides(["monitor=yes"])
    with pytest.raises(ValueError, match="monitor_every must be >= 1, got 0"):
        TrainConfig(monitor_every=0)
    with pytest.raises(TypeError, match="monitor must be bool, got 1"):
        TrainConfig(monitor=1)
