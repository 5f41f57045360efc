"""The study framework: verdicts from numbers, run directories, reports and the README table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bnlab.lab.cli import main
from bnlab.lab.studies import (
    Study,
    StudyResult,
    compare,
    get_study,
    judge,
    run_study,
    study_names,
)
from bnlab.lab.studies._base import Table


def test_verdict_rule_needs_an_effect_beyond_noise() -> None:
    assert compare([0.90, 0.91, 0.92], [0.80, 0.81, 0.79])[0] == "supported"
    assert compare([0.80, 0.81, 0.79], [0.90, 0.91, 0.92])[0] == "contradicted"
    # a 1-point difference inside a 5-point seed-to-seed spread is no evidence
    assert compare([0.85, 0.95, 0.80], [0.84, 0.94, 0.79])[0] == "not shown"
    # lower is better (a gap, a time)
    verdict, diff = compare([0.01, 0.012], [0.05, 0.052], higher_is_better=False)
    assert verdict == "supported" and diff == pytest.approx(0.04)
    # one seed: only the minimum effect guards
    assert compare([0.803], [0.800])[0] == "not shown"


def test_verdict_rule_states_its_numbers_and_its_edges() -> None:
    c = judge("acc", [0.9, 0.9], [0.8, 0.8], with_label="BN", without_label="none",
              min_effect=0.05)
    assert (c.mean_with, c.mean_without, c.se) == (pytest.approx(0.9), pytest.approx(0.8), 0.0)
    assert c.diff == pytest.approx(0.1) and c.low == c.high == c.diff and c.verdict == "supported"
    # no spread between equal seeds: the minimum effect alone decides, in both directions
    assert judge("acc", [0.84, 0.84], [0.8, 0.8], min_effect=0.05).verdict == "not shown"
    assert judge("acc", [0.74, 0.74], [0.8, 0.8], min_effect=0.05).verdict == "contradicted"
    # one seed has no standard deviation (nan, bnlab's one convention): no verdict, however
    # large the difference
    c = judge("acc", [0.5], [0.8], min_effect=0.05)
    assert math.isnan(c.se) and c.verdict == "not shown"
    # lower is better flips the sign of the difference, not the rule
    c = judge("gap", [0.10, 0.11], [0.01, 0.02], higher_is_better=False)
    assert c.verdict == "contradicted" and c.diff == pytest.approx(-0.09)
    # the interval must clear zero: a large mean difference with a larger spread is no evidence
    c = judge("acc", [0.5, 0.9, 0.1, 0.9], [0.3, 0.3, 0.3, 0.3])
    assert c.diff == pytest.approx(0.3) and c.low < 0 < c.high and c.verdict == "not shown"
    assert judge("acc", [float("nan")], [0.5]).verdict == "not shown"
    with pytest.raises(ValueError, match="min_effect"):
        judge("acc", [1.0], [0.0], min_effect=-1)
    with pytest.raises(ValueError, match="at least one value"):
        judge("acc", [], [0.0])


# Made-up numbers for each study's rule: a builder from the headline measure's values per seed
# (with, without) to the study's ``numbers``, then values that are clearly better in the
# claim's direction, clearly worse, and equal means inside a wide spread.
def _acc(center: float) -> list[float]:
    return [center + d for d in (0.0, 0.01, -0.01, 0.005, -0.005)]


NOISY = ([0.80, 0.85, 0.75, 0.82, 0.78], [0.81, 0.79, 0.84, 0.76, 0.80])


def _ioffe(w, wo):
    return {"early_acc": {"bn": w, "none": wo}, "acc": {"bn": w, "none": wo},
            "drift": {"bn": [1.0] * 5, "none": [1.0] * 5}, "steps": [100, 200, 1500],
            "early_step": 100}


def _learning_rate(w, wo):
    never = {"acc": [0.1] * 5, "diverged": [True] * 5, "steps_to": [None] * 5}
    runs = {n: {"0.01": {"acc": [0.8] * 5, "diverged": [False] * 5, "steps_to": v},
                "0.1": never} for n, v in (("bn", w), ("none", wo))}
    return {"lrs": [0.01, 0.1], "target": 0.8, "steps": 300, "eval_every": 25, "runs": runs}


def _batch_size(w, wo):
    acc = {}
    for norm, drop in (("bn", w), ("gn", wo), ("ln", wo)):
        acc[f"{norm}/128/iid"] = [0.85] * 5
        acc[f"{norm}/2/iid"] = [0.85 - d for d in drop]
        acc[f"{norm}/128/sorted"] = [0.8] * 5
    return {"batch_sizes": [2, 128], "acc": acc}


def _regularization(w, wo):
    acc = {n: [0.8] * 5 for n in ("bn", "none", "dropout", "bn+dropout", "dropout-before-bn")}
    return {"acc": acc, "gap": {"bn": w, "none": wo}}


def _running_stats(w, wo):
    from bnlab.lab.studies.running_stats import CONFIGS

    ev = {c: [0.8] * 5 for c in CONFIGS}
    bs = {c: [0.8] * 5 for c in CONFIGS}
    ev["ema m=0.01"] = [0.8 - v for v in w]
    bs["ema m=0.01"] = [0.8 - v for v in wo]
    return {"eval": ev, "batch_stats": bs}


def _depth(w, wo):
    ratios = {str((10, a, bn)): v for a in ("sigmoid", "tanh", "relu")
              for bn, v in ((True, w), (False, wo))}
    accs = {k: [0.5] * 5 for k in ratios}
    return {"depths": [10], "ratios": ratios, "accs": accs}


def _shift(w, wo):
    return {"shifted": {"adabn": w, "source": wo, "tent": wo},
            "clean": {"source": [0.9] * 5, "adabn": [0.9] * 5, "tent": [0.9] * 5}}


def _beyond_images(w, wo):
    acc = {}
    for m in ("mnist1d_mlp", "mnist1d_cnn", "transformer"):
        acc.update({f"{m}/bn": w, f"{m}/none": wo, f"{m}/ln": wo})
    return {"acc": acc}


def _sequences(w, wo):
    cells = [f"{d}/{m}" for d in ("japanese-vowels", "mnist1d-crop")
             for m in ("cnn", "transformer")]
    test = {}
    for c in cells:
        test.update({f"{c}/bn-masked": w, f"{c}/bn-padded": wo, f"{c}/layernorm": wo,
                     f"{c}/none": [0.5] * 5, f"{c}/powernorm": wo})
    return {"datasets": ["japanese-vowels", "mnist1d-crop"], "models": ["cnn", "transformer"],
            "norms": ["none", "layernorm", "bn-padded", "bn-masked", "powernorm"], "test": test}


def _cost(w, wo):
    # times in units of the median time without BN, which the made-up lists put at 1
    return {"train_s": {"torch BN": w, "no BN": wo, "bnlab BN (native)": wo},
            "eval_s": {"torch BN": w, "no BN": wo, "folded BN (inference)": wo}}


STEPS_GOOD, STEPS_BAD = [50, 75, 50, 50, 75], [250, 275, 250, 300, 250]
SPREAD_HIGH, SPREAD_LOW = [0.30, 0.25, 0.31, 0.28, 0.30], [0.0, 0.01, 0.0, 0.005, 0.0]
RATIO_GOOD, RATIO_BAD = [0.1, 0.2, 0.15, 0.1, 0.2], [2.0, 2.5, 1.8, 2.2, 2.1]
# name -> (builder, values as the claim predicts for "with", for "without", noisy with/without)
MADE_UP = {
    "ioffe-mnist": (_ioffe, _acc(0.9), _acc(0.7), NOISY),
    "learning-rate": (_learning_rate, STEPS_GOOD, STEPS_BAD,
                      ([100, 200, 150, 100, 200], [150, 100, 200, 150, 150])),
    "batch-size": (_batch_size, _acc(0.1), _acc(0.0),
                   ([0.05, 0.10, 0.0, 0.07, 0.03], [0.06, 0.02, 0.09, 0.04, 0.04])),
    "regularization": (_regularization, _acc(0.02), _acc(0.10),
                       ([0.05, 0.08, 0.02, 0.06, 0.04], [0.04, 0.07, 0.05, 0.03, 0.06])),
    "running-stats": (_running_stats, SPREAD_HIGH, SPREAD_LOW,
                      ([0.05, 0.10, 0.02, 0.08, 0.04], [0.06, 0.03, 0.09, 0.05, 0.06])),
    "depth": (_depth, RATIO_GOOD, RATIO_BAD,
              ([1.0, 1.5, 0.5, 1.2, 0.8], [1.1, 0.7, 1.4, 0.9, 0.9])),
    "shift": (_shift, _acc(0.8), _acc(0.6), NOISY),
    "beyond-images": (_beyond_images, _acc(0.9), _acc(0.7), NOISY),
    "sequences": (_sequences, _acc(0.9), _acc(0.7), NOISY),
    "cost": (_cost, [1.3, 1.32, 1.28, 1.31, 1.3], [1.0, 1.02, 0.98, 1.01, 1.0],
             ([1.0, 1.2, 0.8, 1.1, 0.9], [1.05, 0.9, 1.1, 1.0, 0.95])),
}


def test_verdict_rule_has_made_up_numbers_for_every_study() -> None:
    assert sorted(MADE_UP) == sorted(study_names())
    assert all(get_study(n).decide is not None for n in study_names())


@pytest.mark.parametrize("verdict", ["supported", "contradicted", "not shown"])
@pytest.mark.parametrize("name", sorted(MADE_UP))
def test_verdict_of_each_study_from_made_up_numbers(name: str, verdict: str) -> None:
    build, claimed, opposite, (noisy_w, noisy_wo) = MADE_UP[name]
    if verdict == "supported":
        w, wo = claimed, opposite
    elif verdict == "contradicted":
        w, wo = opposite, claimed
    else:
        w, wo = noisy_w, noisy_wo
    numbers = json.loads(json.dumps(build(w, wo)))  # as read back from results.json
    head = get_study(name).decide(numbers)[0]
    assert head.verdict == verdict, head.sentence()
    # the headline compares exactly the made-up values (cost: relative to the median without)
    scale = sorted(wo)[len(wo) // 2] if name == "cost" else 1.0
    assert head.with_values == pytest.approx([v / scale for v in w])
    assert head.without_values == pytest.approx([v / scale for v in wo])


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
    assert "**Claim (from the tutorial):** toys help" in md and "| 1 | 5 |" in md
    # reports are regenerated from the directory alone
    (out / "report.md").unlink()
    assert main(["study", "report", str(out)]) == 0
    assert "Verdict:** supported" in (out / "report.md").read_text()


def test_verdict_numbers_are_in_the_report(tmp_path: Path) -> None:
    def run(ctx):
        c = judge("score", [0.7, 0.71, 0.69], [0.5, 0.52, 0.48], with_label="toy",
                  without_label="none")
        return StudyResult(verdict=c.verdict, evidence=c.sentence(), measured="toy",
                           comparisons=[c])

    study = Study(name="toy", claim="toys help", method="counting", presets={"quick": {}},
                  run=run)
    out = run_study(study, "quick", 3, tmp_path / "toy", log=lambda m: None)
    md = (out / "report.md").read_text()
    assert "| **headline** score (higher as claimed) | toy | 0.7 | none | 0.5 | +0.2 | " \
           "[+0.1742, +0.2258] | 0.005 | supported |" in md, md
    assert "The verdict's numbers" in (out / "report.html").read_text()
    # a verdict that is not the headline comparison's is refused
    bad = Study(name="toy", claim="c", method="m", presets={"quick": {}},
                run=lambda ctx: StudyResult("contradicted", "e", "m",
                                            comparisons=[judge("s", [1.0], [0.0])]))
    with pytest.raises(RuntimeError, match="not its headline"):
        run_study(bad, "quick", 1, tmp_path / "bad", log=lambda m: None)


def test_committed_study_reports_still_render(tmp_path: Path) -> None:
    import shutil

    for d in sorted((Path(__file__).parents[1] / "docs" / "studies").glob("*/results.json")):
        copy = tmp_path / d.parent.name
        shutil.copytree(d.parent, copy)
        assert main(["study", "report", str(copy)]) == 0
        assert "**Verdict:**" in (copy / "report.md").read_text()


def test_overrides_are_parsed_by_the_preset_type(tmp_path: Path) -> None:
    seen = {}

    def run(ctx):
        seen.update(ctx.settings)
        return StudyResult("not shown", "e", "m")

    study = Study(name="t", claim="c", method="m", run=run,
                  presets={"quick": {"flag": True, "n": 3, "lr": 0.1, "name": "a", "x": None}})
    run_study(study, "quick", 1, tmp_path / "a", log=lambda m: None,
              overrides={"flag": "false", "n": "7", "lr": "1e-3", "name": "b", "x": "raw"})
    assert seen == {"flag": False, "n": 7, "lr": 0.001, "name": "b", "x": "raw"}
    run_study(study, "quick", 1, tmp_path / "b", log=lambda m: None,
              overrides={"flag": "YES"})
    assert seen["flag"] is True
    for key, value, msg in (("flag", "maybe", "expects true or false"),
                            ("n", "2.5", "expects an integer"), ("lr", "fast", "a number")):
        with pytest.raises(ValueError, match=f"setting '{key}' {msg}" if key != "lr" else msg):
            run_study(study, "quick", 1, tmp_path / "c", log=lambda m: None,
                      overrides={key: value})


def test_unknown_setting_and_preset_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown setting 'steps'; valid: k"):
        run_study(TOY, "quick", 1, tmp_path, overrides={"steps": "3"})
    with pytest.raises(ValueError, match=r"preset must be one of \['full', 'quick'\], got 'fast'"):
        run_study(TOY, "fast", 1, tmp_path)


def test_every_study_is_registered_with_quick_and_full_presets() -> None:
    assert len(study_names()) == 10
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
    _assert_verdict_follows_from_numbers("depth", r)
    assert len(r["tables"][0]["rows"]) == 6  # 3 activations x with/without BN
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3


def _assert_verdict_follows_from_numbers(name: str, r: dict) -> None:
    """The stored verdict is the headline comparison's, and the rule applied again to the
    stored numbers gives every stored comparison back."""
    assert r["verdict"] == r["comparisons"][0]["verdict"]
    again = get_study(name).decide(r["numbers"])
    assert len(again) == len(r["comparisons"])
    for c, stored in zip(again, r["comparisons"], strict=True):
        for key, value in c.as_dict().items():
            if isinstance(value, float) or (isinstance(value, list) and value):
                assert value == pytest.approx(stored[key], nan_ok=True), key
            else:
                assert value == stored[key], key
    for c in r["comparisons"]:
        assert c["mean_with"] == pytest.approx(sum(c["with_values"]) / len(c["with_values"]))
        if math.isnan(c["se"]):  # a side with one value: no spread, no verdict
            assert c["verdict"] == "not shown"
        else:
            assert c["low"] <= c["diff"] <= c["high"]


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
    "sequences": {"vowels_steps": "3", "mnist1d_steps": "3", "lrs": "0.003,0.01"},
    "shift": {"train": "512", "test": "256", "epochs": "1", "max_severity": "1"},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_each_study_runs_end_to_end(name: str, tmp_path: Path) -> None:
    # two seeds: the studies' runner trains them together where the network packs
    out = run_study(get_study(name), "quick", 2, tmp_path / name, overrides=TINY[name],
                    log=lambda m: None)
    r = json.loads((out / "results.json").read_text())
    _assert_verdict_follows_from_numbers(name, r)
    assert r["evidence"].startswith(r["comparisons"][0]["measure"].split(" (")[0][:10]) or \
        r["comparisons"][0]["measure"] in r["evidence"]
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
    _assert_verdict_follows_from_numbers("cost", r)


# ------------------------------------------------------------------ seeds trained together
def _toy_data(shape: tuple[int, ...], scale: float = 1.0):
    import torch

    g = torch.Generator().manual_seed(1)
    return (torch.randn(600, *shape, generator=g) * scale,
            torch.randint(0, 10, (600,), generator=g),
            torch.randn(200, *shape, generator=g), torch.randint(0, 10, (200,), generator=g))


def _together_and_alone(build, shape, cfg, seeds=(0, 1, 2), scale=1.0):
    from bnlab.lab.studies._fit import fit_seeds

    data = _toy_data(shape, scale)
    return (fit_seeds(build, list(seeds), *data, cfg, together=True),
            fit_seeds(build, list(seeds), *data, cfg, together=False))


def _small_cnn_window():
    from bnlab.lab.models import small_cnn

    return small_cnn("bn-window", norm_kwargs={"window_size": 3})


def _together_cases():
    from bnlab.lab.models import ioffe_mlp, mnist1d_cnn, mnist1d_mlp
    from bnlab.lab.studies._fit import FitConfig
    from bnlab.lab.studies.depth import deep_mlp

    sgd = FitConfig(steps=20, batch_size=16, lr=0.05, optimizer="sgd", eval_every=5)
    # Adam only where no bias feeds a BN: such a bias has no gradient but float noise, which
    # Adam scales to full steps, so it would follow the rounding instead of the data
    adam = FitConfig(steps=12, batch_size=16, lr=1e-3, optimizer="adam", eval_every=4,
                     class_sorted=True)
    return {
        "mnist1d_mlp": (lambda: mnist1d_mlp("bn"), (40,), sgd),
        "mnist1d_mlp LayerNorm": (lambda: mnist1d_mlp("ln"), (40,), sgd),
        "mnist1d_cnn": (lambda: mnist1d_cnn("bn"), (40,), sgd),
        "ioffe_mlp": (lambda: ioffe_mlp("bn"), (1, 28, 28), sgd),
        "deep_mlp": (lambda: deep_mlp(5, "tanh", True), (1, 28, 28), sgd),
        "small_cnn window, Adam, class-sorted": (_small_cnn_window, (1, 28, 28), adam),
    }


@pytest.mark.parametrize("case", ["mnist1d_mlp", "mnist1d_mlp LayerNorm", "mnist1d_cnn",
                                  "ioffe_mlp", "deep_mlp",
                                  "small_cnn window, Adam, class-sorted"])
def test_seeds_trained_together_equal_each_seed_trained_alone(case: str) -> None:
    import torch

    build, shape, cfg = _together_cases()[case]
    together, alone = _together_and_alone(build, shape, cfg)
    for (m_t, r_t), (m_a, r_a) in zip(together, alone, strict=True):
        # float32 tolerance: the packed kernels (batched matrix products, grouped
        # convolutions) sum in another order than the single network's
        for (key, a), t in zip(m_a.state_dict().items(), m_t.state_dict().values(),
                               strict=True):
            torch.testing.assert_close(t, a, rtol=1e-4, atol=1e-5, msg=key)
        assert r_t.steps == r_a.steps and not r_t.diverged and not r_a.diverged
        assert r_t.test_acc == pytest.approx(r_a.test_acc, abs=1 / 200)
        assert r_t.train_loss == pytest.approx(r_a.train_loss, rel=1e-4)
        assert r_t.final_train_acc == pytest.approx(r_a.final_train_acc, abs=1 / 200)
    # the members differ: each has its own initialisation and data order
    w = [m.state_dict() for m, _ in together]
    assert not torch.equal(next(iter(w[0].values())), next(iter(w[1].values())))


def test_bn_mlps_pack_feature_major() -> None:
    """BN MLPs train in the copy-free (S, C, B) layout; networks it cannot express (a
    LayerNorm normalises each example, a convolution needs (B, S*C, L)) keep (B, S*C)."""
    from torch import nn

    from bnlab.lab.models import ioffe_mlp, mnist1d_cnn, mnist1d_mlp
    from bnlab.lab.studies._pack import NotPackable, Pack
    from bnlab.lab.studies.depth import deep_mlp

    cases = ((lambda: ioffe_mlp("bn"), True), (lambda: deep_mlp(3, "relu", True), True),
             (lambda: mnist1d_mlp("bn"), True), (lambda: mnist1d_mlp("none"), True),
             (lambda: mnist1d_mlp("ln"), False),
             (lambda: mnist1d_mlp("bn-window", norm_kwargs={"window_size": 2}), True),
             (lambda: mnist1d_cnn("bn"), False))
    for build, expected in cases:
        assert Pack([build(), build()]).feature_major is expected
    # a Flatten that keeps a dimension is refused in either layout (members would differ)
    with pytest.raises(NotPackable, match="Flatten must flatten"):
        Pack([nn.Sequential(nn.Flatten(2), nn.Linear(4, 3)) for _ in range(2)])


def test_seeds_together_stop_where_each_alone_diverges() -> None:
    from bnlab.lab.models import mnist1d_mlp
    from bnlab.lab.studies._fit import FitConfig

    cfg = FitConfig(steps=30, batch_size=16, lr=4.0, optimizer="sgd", eval_every=5)
    together, alone = _together_and_alone(lambda: mnist1d_mlp("none"), (40,), cfg,
                                          seeds=range(5), scale=3.0)
    flags = [r.diverged for _, r in alone]
    assert any(flags) and not all(flags)  # some seeds diverge, at different steps
    assert [r.diverged for _, r in together] == flags
    for (m_t, r_t), (m_a, r_a) in zip(together, alone, strict=True):
        assert r_t.steps == r_a.steps
        assert r_t.final_test_acc == pytest.approx(r_a.final_test_acc, abs=1 / 200)
        if not r_a.diverged:  # the survivors trained on as if alone (lr 4: weights of 1e3
            # and more, so the tolerance is relative to each tensor's largest value)
            for a, t in zip(m_a.state_dict().values(), m_t.state_dict().values(), strict=True):
                assert (t - a).abs().max() <= 1e-4 * a.abs().max()


def test_networks_with_dropout_train_seed_by_seed() -> None:
    import torch

    from bnlab.lab.studies._fit import FitConfig
    from bnlab.lab.studies._pack import NotPackable, Pack
    from bnlab.lab.studies.regularization import make_model

    with pytest.raises(NotPackable, match="Dropout"):
        Pack([make_model(True, "head") for _ in range(2)])
    cfg = FitConfig(steps=3, batch_size=16, lr=1e-3, optimizer="adam")
    together, alone = _together_and_alone(lambda: make_model(True, "head"), (1, 28, 28), cfg,
                                          seeds=(0, 1))
    for (m_t, _), (m_a, _) in zip(together, alone, strict=True):
        for a, t in zip(m_a.state_dict().values(), m_t.state_dict().values(), strict=True):
            assert torch.equal(a, t)


def test_fit_is_the_plain_training_loop() -> None:
    """A model trained alone goes through the studies' one loop (a pack of one); it must
    equal the textbook loop over the same seeded batches."""
    import torch
    from torch import nn

    from bnlab.lab.models import mnist1d_mlp
    from bnlab.lab.studies._fit import FitConfig, batches, fit

    x, y, xt, yt = _toy_data((40,), 1.0)
    cfg = FitConfig(steps=15, batch_size=16, lr=1e-3, optimizer="adam", eval_every=5, seed=3)
    torch.manual_seed(3)
    model = mnist1d_mlp("bn")
    ref = mnist1d_mlp("bn")
    ref.load_state_dict(model.state_dict())
    res = fit(model, x, y, xt, yt, cfg)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    stream, losses = batches(len(x), cfg, y), []
    ref.train()
    for _ in range(cfg.steps):
        idx = next(stream)
        loss = nn.functional.cross_entropy(ref(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for (key, a), b in zip(ref.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=key)
    assert res.steps == [5, 10, 15] and not res.diverged
    assert res.train_loss == pytest.approx([sum(losses[i:i + 5]) / 5 for i in (0, 5, 10)],
                                           rel=1e-5)


def test_fit_without_test_data_evaluates_nothing_on_it() -> None:
    import math

    from bnlab.lab.models import mnist1d_mlp
    from bnlab.lab.studies._fit import FitConfig, fit

    x, y, _, _ = _toy_data((40,), 1.0)
    res = fit(mnist1d_mlp("bn"), x, y, None, None,
              FitConfig(steps=4, batch_size=16, lr=0.05, eval_every=2), eval_train=0)
    assert res.steps == [] and math.isnan(res.final_test_acc)
    assert math.isnan(res.final_train_acc) and not res.diverged


def test_seeds_train_together_where_it_pays() -> None:
    """The default packs MLPs and 1-D CNNs; 2-D CNNs (slower packed on a CPU) go seed by seed,
    with the same results as asking for that."""
    from unittest import mock

    import torch

    from bnlab.lab.models import mnist1d_mlp, small_cnn
    from bnlab.lab.studies import _pack
    from bnlab.lab.studies._fit import FitConfig, fit_seeds

    cfg = FitConfig(steps=3, batch_size=16, lr=0.05)
    for build, shape, packs in ((lambda: mnist1d_mlp("bn"), (40,), True),
                                (lambda: small_cnn("bn"), (1, 28, 28), False)):
        data = _toy_data(shape)
        with mock.patch.object(_pack, "Pack", wraps=_pack.Pack) as spy:
            auto = fit_seeds(build, [0, 1], *data, cfg)
        assert spy.called == packs
        alone = fit_seeds(build, [0, 1], *data, cfg, together=False)
        for (m_a, _), (m_b, _) in zip(auto, alone, strict=True):
            for a, b in zip(m_a.state_dict().values(), m_b.state_dict().values(), strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
