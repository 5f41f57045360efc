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
    assert block == results_table(RUNS).strip()
