"""The study framework: verdicts from numbers, run directories, reports and the README table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bnlab.cli import main
from bnlab.studies import Study, StudyResult, compare, get_study, run_study, study_names
from bnlab.studies._base import Table


def test_compare_needs_an_effect_beyond_noise() -> None:
    assert compare([0.90, 0.91, 0.92], [0.80, 0.81, 0.79])[0] == "supported"
    assert compare([0.80, 0.81, 0.79], [0.90, 0.91, 0.92])[0] == "contradicted"
    # a 1-point difference inside a 5-point seed-to-seed spread is no evidence
    assert compare([0.85, 0.95, 0.80], [0.84, 0.94, 0.79])[0] == "not shown"
    # lower is better (a gap, a time)
    verdict, diff = compare([0.01, 0.012], [0.05, 0.052], higher_is_better=False)
    assert verdict == "supported" and diff == pytest.approx(0.04)
    # one seed: only the minimum effect guards
    assert compare([0.803], [0.800])[0] == "not shown"


def _toy_run(ctx):
    scores = [0.6 + 0.01 * s for s in ctx.seeds]
    base = [0.5 for _ in ctx.seeds]
    verdict, diff = compare(scores, base)
    return StudyResult(verdict=verdict, evidence=f"diff {diff:+.2f}", measured="toy",
                       tables=[Table("t", ["a", "b"], [[1, ctx.settings["k"]]])],
                       numbers={"scores": scores})


TOY = Study(name="toy", claim="toys help", method="counting",
            presets={"quick": {"k": 3}, "full": {"k": 9}}, run=_toy_run)


def test_run_study_writes_run_directory_and_derived_report(tmp_path: Path) -> None:
    out = run_study(TOY, "quick", 3, tmp_path / "toy", overrides={"k": "5"}, log=lambda m: None)
    config = json.loads((out / "config.json").read_text())
    assert config["settings"] == {"k": 5} and config["seeds"] == [0, 1, 2]
    results = json.loads((out / "results.json").read_text())
    assert results["verdict"] == "supported" and results["numbers"]["scores"][2] == 0.62
    assert "torch" in json.loads((out / "environment.json").read_text())
    md = (out / "report.md").read_text()
    assert "**Claim (from the seed):** toys help" in md and "| 1 | 5 |" in md
    # reports are regenerated from the directory alone
    (out / "report.md").unlink()
    assert main(["study", "report", str(out)]) == 0
    assert "Verdict:** supported" in (out / "report.md").read_text()


def test_unknown_setting_and_preset_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown setting 'steps'; valid: k"):
        run_study(TOY, "quick", 1, tmp_path, overrides={"steps": "3"})
    with pytest.raises(ValueError, match=r"preset must be one of \['full', 'quick'\], got 'fast'"):
        run_study(TOY, "fast", 1, tmp_path)


def test_every_study_is_registered_with_quick_and_full_presets() -> None:
    assert len(study_names()) == 9
    for name in study_names():
        st = get_study(name)
        assert st.name == name and {"quick", "full"} <= set(st.presets) and st.claim
    with pytest.raises(ValueError, match="unknown study 'speed'; valid names: batch-size"):
        get_study("speed")


def test_results_table_is_generated_into_the_readme(tmp_path: Path, capsys) -> None:
    run_study(TOY, "quick", 2, tmp_path / "runs" / "toy", log=lambda m: None)
    readme = tmp_path / "README.md"
    readme.write_text(
        "intro\n<!-- results-table:begin -->\nold\n<!-- results-table:end -->\nend\n")
    assert main(["study", "table", str(tmp_path / "runs"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text
    assert "| toys help | `toy` (quick, 2 seeds) | toy | **supported**" in text
    assert text.startswith("intro\n") and text.endswith("end\n")


def test_study_list_names_every_study(capsys) -> None:
    assert main(["study", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in study_names())


@pytest.mark.slow
def test_depth_study_runs_on_real_data(tmp_path: Path) -> None:
    out = run_study(get_study("depth"), "quick", 1, tmp_path / "depth",
                    overrides={"depths": "2", "steps": "5", "train": "512", "test": "256"},
                    log=lambda m: None)
    r = json.loads((out / "results.json").read_text())
    assert r["verdict"] in ("supported", "contradicted", "not shown")
    assert len(r["tables"][0]["rows"]) == 6  # 3 activations x with/without BN
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3


# Settings that make each study a seconds-long smoke run on real data: it must run end to end,
# reach a verdict and write its report. (The cost study times code; it has its own smoke test.)
TINY = {
    "ioffe-mnist": {"steps": "20", "eval_every": "10", "train": "600", "test": "200"},
    "learning-rate": {"lrs": "0.05,5.0", "steps": "10", "eval_every": "5", "train": "600",
                      "test": "200"},
    "batch-size": {"batch_sizes": "4,32", "examples": "128", "train": "600", "test": "200"},
    "regularization": {"steps": "5", "train": "300", "test": "200"},
    "running-stats": {"steps": "5", "train": "600", "test": "256"},
    "beyond-images": {"steps": "5", "seq_steps": "3"},
    "shift": {"train": "512", "test": "256", "epochs": "1", "max_severity": "1"},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_each_study_runs_end_to_end(name: str, tmp_path: Path) -> None:
    out = run_study(get_study(name), "quick", 1, tmp_path / name, overrides=TINY[name],
                    log=lambda m: None)
    r = json.loads((out / "results.json").read_text())
    assert r["verdict"] in ("supported", "contradicted", "not shown") and r["evidence"]
    assert r["tables"] and all(t["rows"] for t in r["tables"])
    for _, fig in r["figures"]:
        assert (out / fig).stat().st_size > 1000
    assert "Verdict:" in (out / "report.md").read_text()


@pytest.mark.slow
def test_cost_study_times_every_variant(tmp_path: Path) -> None:
    out = run_study(get_study("cost"), "quick", 1, tmp_path / "cost",
                    overrides={"rounds": "1", "train_batches": "2", "eval_batches": "1",
                               "threads": "1", "train": "512", "test": "1000"},
                    log=lambda m: None)
    r = json.loads((out / "results.json").read_text())
    assert set(r["numbers"]["eval_s_per_batch"]) == {
        "no BN", "torch BN", "bnlab BN (torch backend)", "bnlab BN (native)",
        "bnlab fused BN+ReLU (native)", "folded BN (inference)"}
    assert all(v > 0 for v in r["numbers"]["train_s_per_batch"].values())
