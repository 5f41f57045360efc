"""The committed evidence (``docs/studies``) is what the README says it is.

Every committed study run has at least five seeds, each of the ten studies has one, and the
README's results table is exactly what ``bnlab study table docs/studies`` generates from them
(nobody edits it by hand).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bnlab.lab.commands.study import README_BEGIN, README_END, results_table
from bnlab.lab.studies import study_names

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "studies"
RUNS = sorted(p.parent for p in DOCS.glob("*/results.json"))
QUICK = sorted(p.parent for p in (DOCS / "quick").glob("*/results.json"))
#: the committed speedrun (``bnlab speedrun --norm bn,none``): its row closes the table
SPEEDRUN = ROOT / "docs" / "speedrun" / "run"


def test_every_study_has_a_committed_run():
    studies = {json.loads((d / "config.json").read_text())["study"] for d in RUNS}
    assert studies == set(study_names())


@pytest.mark.parametrize("run", RUNS + QUICK, ids=lambda d: str(d.relative_to(DOCS)))
def test_committed_runs_have_five_seeds_and_agree_with_their_directory(run: Path):
    config = json.loads((run / "config.json").read_text())
    results = json.loads((run / "results.json").read_text())
    assert len(config["seeds"]) >= 5
    assert results["seeds"] == config["seeds"] and results["preset"] == config["preset"]
    assert run.name == config["study"]
    if run.parent.name == "quick":  # kept beside the study's full run
        assert config["preset"] == "quick" and (DOCS / run.name / "results.json").exists()
        assert json.loads((DOCS / run.name / "config.json").read_text())["preset"] == "full"


def test_readme_table_is_generated_from_the_committed_runs():
    text = (ROOT / "README.md").read_text()
    block = text.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip()
    assert block == results_table(RUNS + [SPEEDRUN]).strip()


def test_the_committed_speedrun_is_the_issue_s_run():
    config = json.loads((SPEEDRUN / "config.json").read_text())
    r = json.loads((SPEEDRUN / "results.json").read_text())
    assert config["budget_s"] == 60 and config["target"] == 0.93 and config["seeds"] == 5
    assert config["split"] == "test" and not config["train_subset"]
    assert not config["eval_subset"] and config["norms"] == ["bn", "none"]
    runs = r["runs"]
    for norm in ("bn", "none"):
        assert sorted(x["seed"] for x in runs if x["norm"] == norm) == [0, 1, 2, 3, 4]
    for x in runs:
        assert set(x) >= {"seed", "norm", "test_accuracy", "time_to"}
        assert set(x["time_to"]) == {"0.90", "0.91", "0.92", "0.93"}
        assert x["eval_images"] == 10_000 and x["train_images"] == 60_000
    assert r["verdict"] in ("supported", "contradicted", "not shown")
    # the recipes it ran are the library's
    from bnlab.lab.speedrun import RECIPES

    assert {n: RECIPES[n].as_dict() for n in ("bn", "none")} == config["recipes"]
