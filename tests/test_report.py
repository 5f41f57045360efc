"""The report's table and sentences are computed from the runs' numbers."""

from __future__ import annotations

from pathlib import Path

from bnlab.lab.report import Group, Run, table_rows, verdict
from bnlab.lab.train import TrainConfig


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



def test_one_page_writer_gives_named_paths_and_the_same_text_in_both_files(tmp_path):
    from bnlab.lab.report.page import Figure, Heading, ReportPaths, Table, Text, write_page

    png = b"\x89PNG\r\n\x1a\n" + b"0" * 16
    paths = write_page(tmp_path / "r", "Study `toy`", [
        Text("**Claim:** toys `help`"), Text("**Verdict:** yes.", "answer"), Heading("Numbers"),
        Table(["measure", "mean", "mean"], [["**headline** a", 1, 2]]),
        Figure("a plot", "report-files/a.png", png)])
    assert paths == ReportPaths(tmp_path / "r" / "report.md", tmp_path / "r" / "report.html")
    md, page = paths.markdown.read_text(), paths.html.read_text()
    assert md.startswith("# Study `toy`\n\n**Claim:** toys `help`\n")
    assert "| measure | mean | mean |\n|---|---|---|\n| **headline** a | 1 | 2 |" in md
    assert "![a plot](report-files/a.png)" in md
    assert (tmp_path / "r" / "report-files" / "a.png").read_bytes() == png
    assert "<title>Study toy</title>" in page and "<h1>Study <code>toy</code></h1>" in page
    assert '<p class="answer"><b>Verdict:</b> yes.</p>' in page
    assert "<td><b>headline</b> a</td>" in page and 'id="fig-a"' in page
    # a figure already in the folder (a study's) is read, not written
    again = write_page(tmp_path / "r", "t", [Figure("same", "report-files/a.png")])
    assert "data:image/png;base64," in again.html.read_text()
    assert not list((tmp_path / "r").rglob("*.tmp*"))  # written through a rename, nothing left
