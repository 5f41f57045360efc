"""The report's table and sentences are computed from the runs' numbers."""

from __future__ import annotations

from pathlib import Path

from bnlab.report import Group, Run, table_rows, verdict
from bnlab.train import TrainConfig


def _run(norm: str, seed: int, val: list[float], train: list[float] | None = None,
         t: float = 2.0) -> Run:
    train = train or val
    epochs = [{"epoch": i, "val_acc": v, "train_acc": tr, "val_loss": 1 - v, "train_loss": 1 - tr,
               "epoch_time": t} for i, (v, tr) in enumerate(zip(val, train, strict=True))]
    return Run(Path("."), TrainConfig(norm=norm, seed=seed), epochs, [], {}, {})


def _groups(none_vals, bn_vals, t_none=2.0, t_bn=3.0):
    none = Group("none", [_run("none", s, v, t=t_none) for s, v in enumerate(none_vals)])
    bn = Group("bn", [_run("bn", s, v, t=t_bn) for s, v in enumerate(bn_vals)])
    return [none, bn]


def test_bn_helped_by_the_computed_amount():
    s = verdict(_groups([[0.80, 0.85]], [[0.86, 0.87]]))
    assert s[0].startswith("In this run BN helped: final validation accuracy 87.00% against "
                           "85.00% without normalisation (+2.00 points; best epoch +2.00 points)")
    assert "one seed each" in s[0]
    assert s[1] == "An epoch with `bn` took 1.50x the time of one without normalisation."


def test_bn_did_not_help_and_spread_is_reported():
    s = verdict(_groups([[0.90], [0.92]], [[0.905], [0.905]]))
    assert s[0].startswith("In this run BN did not help: final validation accuracy 90.50% "
                           "against 91.00% without normalisation (-0.50 points")
    assert "within the seed-to-seed spread (1.41 points sd)" in s[0]
    s = verdict(_groups([[0.90], [0.901]], [[0.95], [0.951]]))
    assert "larger than the seed-to-seed spread" in s[0]


def test_other_variants_and_missing_baseline():
    groups = _groups([[0.8]], [[0.9]])
    groups.append(Group("bn-window", [_run("bn-window", 0, [0.7])]))
    s = verdict(groups)
    assert s[-1].startswith("`bn-window` did not help: final validation accuracy 70.00%")
    assert "cannot say" in verdict(groups[1:])[0]


def test_table_rows_mean_and_sd():
    rows = table_rows(_groups([[0.5, 0.8], [0.6, 0.9]], [[0.9, 0.95]]))
    assert rows[0]["final val acc %"] == "85.00 ± 7.07"
    assert rows[0]["best val acc %"] == "85.00 ± 7.07"
    assert rows[1]["final val acc %"] == "95.00" and rows[1]["seeds"] == 1
    assert rows[0]["s / epoch"] == "2.0 ± 0.0"

