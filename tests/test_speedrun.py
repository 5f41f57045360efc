"""``bnlab speedrun``: the command on a small subset with a 10 s budget, every file of its run
directory, the printed table, the verdict wiring and the one-line errors for bad flags."""

from __future__ import annotations

import json
import math

import pytest

from bnlab.lab.cli import main
from bnlab.lab.speedrun import RECIPES, TARGETS, Recipe, build_model, lr_at
from bnlab.lab.speedrun.run import summarise, time_to
from bnlab.lab.speedrun.worker import process_age

KEYS = ("0.90", "0.91", "0.92", "0.93")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two recipes x two seeds on 2,000 training and 500 test images, 10 s per seed."""
    out = tmp_path_factory.mktemp("speedrun") / "run"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["speedrun", "--norm", "bn,none", "--seeds", "2", "--budget-s", "10",
                   "--train-subset", "2000", "--eval-subset", "500", "--out", str(out)])
    assert rc == 0
    return out, buf.getvalue()


def test_every_file_of_the_run_directory(run):
    out, _ = run
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == [
        "config.json", "environment.json", "evaluations.jsonl", "report.html", "report.md",
        "results.json", "time_to_accuracy.png"]
    config = json.loads((out / "config.json").read_text())
    assert config["budget_s"] == 10 and config["norms"] == ["bn", "none"]
    assert set(config["recipes"]) == {"bn", "none"}
    assert Recipe.from_dict(config["recipes"]["bn"]) == RECIPES["bn"]
    env = json.loads((out / "environment.json").read_text())
    assert "torch" in env and "load_average_at_start" in env
    r = json.loads((out / "results.json").read_text())
    assert r["targets"] == list(KEYS) and r["split"] == "test"
    assert [(x["norm"], x["seed"]) for x in r["runs"]] == [
        ("bn", 0), ("none", 0), ("bn", 1), ("none", 1)]  # interleaved seed by seed
    rows = [json.loads(line) for line in (out / "evaluations.jsonl").read_text().splitlines()]
    for x in r["runs"]:
        assert 0.0 <= x["test_accuracy"] <= 1.0 and x["test_accuracy"] == x["accuracy"]
        assert set(x["time_to"]) == set(KEYS)
        mine = [e for e in rows if e["norm"] == x["norm"] and e["seed"] == x["seed"]]
        assert mine and mine[-1]["accuracy"] == x["accuracy"]
        clocks = [e["clock_s"] for e in mine]
        assert clocks == sorted(clocks) and clocks[0] > 0
        assert [e["step"] for e in mine] == sorted({e["step"] for e in mine})
        for k, v in x["time_to"].items():  # the first evaluation at or above the target
            hit = [e["clock_s"] for e in mine if e["accuracy"] >= float(k)]
            assert v == (hit[0] if hit else None)
        # the clock starts with the process: imports and data loading come first
        assert 0 < x["loaded_s"] <= x["first_step_s"] <= x["clock_s"]
        assert x["stopped"] in ("schedule", "budget")
        if x["stopped"] == "budget":
            assert x["clock_s"] >= 10
    assert r["verdict"] in ("supported", "contradicted", "not shown")
    assert [c["measure"] for c in r["comparisons"]][:3] == [
        "seconds to 0.90 test accuracy", "seconds to 0.92 test accuracy",
        "seconds to 0.93 test accuracy"]
    md = (out / "report.md").read_text()
    assert "Verdict" in md and "time_to_accuracy.png" in md and "Per seed" in md
    assert (out / "time_to_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64" in (out / "report.html").read_text()


def test_printed_table(run):
    out, text = run
    lines = text.splitlines()
    assert lines[0].split() == ["norm", "seed", "test", "acc", "t0.90", "t0.91", "t0.92",
                                "t0.93", "epochs", "end_s", "stopped"]
    r = json.loads((out / "results.json").read_text())
    for line, x in zip(lines[1:5], r["runs"], strict=True):
        cells = line.split()
        assert cells[:3] == [x["norm"], str(x["seed"]), f"{x['accuracy']:.4f}"]
        assert cells[3:7] == [("-" if x["time_to"][k] is None else f"{x['time_to'][k]:.1f}")
                              for k in KEYS]
    assert any(line.startswith("verdict (BN makes training faster): ") for line in lines)
    assert lines[-1] == f"run directory: {out} (report: {out}/report.html)"


def test_out_that_holds_a_run_is_refused(run, capsys):
    out, _ = run
    before = (out / "results.json").read_bytes()
    assert main(["speedrun", "--seeds", "1", "--out", str(out)]) == 2
    assert "already holds a speedrun" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before


@pytest.mark.parametrize("argv, phrase", [
    (["--target", "1.5"], "--target must be an accuracy in (0, 1), got 1.5"),
    (["--target", "0"], "--target must be an accuracy in (0, 1), got 0"),
    (["--budget-s", "0"], "--budget-s must be a positive number of seconds, got 0"),
    (["--budget-s", "nan"], "--budget-s must be a positive number of seconds, got nan"),
    (["--seeds", "0"], "--seeds must be >= 1, got 0"),
    (["--norm", "gn"], "--norm must be bn, none or bn,none, got 'gn'"),
    (["--set", "lr"], "--set takes KEY=VALUE or NORM.KEY=VALUE, got 'lr'"),
    (["--set", "speed=3"], "--set speed: no recipe setting 'speed'"),
    (["--set", "none.lr=0.1"], "--set none.lr: 'none' is not a recipe of this run"),
    (["--set", "lr=-1"], "Recipe: lr must be a finite number > 0, got -1"),
    (["--set", "stages=32,64"], "--set stages= takes WIDTHxCONVS"),
])
def test_bad_flags_are_one_line_errors(argv, phrase, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["speedrun", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("bnlab speedrun: ")
    assert phrase in err
    assert not out.exists()  # refused before anything was made


def test_time_to_and_the_summary_count_a_missed_target_as_the_budget():
    ev = [{"clock_s": 5.0, "accuracy": 0.89}, {"clock_s": 9.0, "accuracy": 0.915},
          {"clock_s": 12.0, "accuracy": 0.905}]
    assert time_to(ev, 0.90) == 9.0 and time_to(ev, 0.91) == 9.0 and time_to(ev, 0.93) is None
    runs = [{"norm": n, "seed": s, "accuracy": a,
             "time_to": {k: t for k in KEYS}} for n, s, a, t in
            [("bn", 0, 0.93, 10.0), ("bn", 1, 0.93, 11.0), ("bn", 2, 0.93, 12.0),
             ("none", 0, 0.90, None), ("none", 1, 0.90, None), ("none", 2, 0.90, 50.0)]]
    s = summarise(runs, TARGETS, 60.0, "test")
    assert s["medians"]["bn"]["time_to_0.90"] == 11.0
    assert s["medians"]["none"]["time_to_0.90"] is None  # 1 of 3 seeds: the median misses
    assert s["medians"]["none"]["reached_0.90"] == "1/3"
    head = s["comparisons"][0]
    assert head["mean_without"] == pytest.approx((60 + 60 + 50) / 3)  # misses count as 60 s
    assert s["verdict"] == "supported"


def test_a_target_with_three_decimals_keeps_them():
    from bnlab.lab.speedrun.run import _key, header

    assert [_key(t) for t in (0.9, 0.93, 0.893)] == ["0.90", "0.93", "0.893"]
    assert "t0.893" in header((0.893, 0.90), "test").split()


def test_schedule_warms_up_and_ends_at_zero():
    r = RECIPES["bn"]
    total = 100
    lrs = [lr_at(r, (s + 1) / total) for s in range(total)]
    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(r.lr) and peak == round(r.warmup * total) - 1
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1], strict=True))  # rising
    assert all(a > b for a, b in zip(lrs[peak:-1], lrs[peak + 1:], strict=True))  # then falling
    assert lrs[-1] == 0.0 and lr_at(r, 0.0) == 0.0 and lr_at(r, 2.0) == 0.0


@pytest.mark.parametrize("norm", ["bn", "none"])
def test_recipes_build_networks_for_28x28(norm):
    import torch

    net = build_model(RECIPES[norm])
    out = net(torch.randn(4, 1, 28, 28).contiguous(memory_format=torch.channels_last))
    assert out.shape == (4, 10) and out.dtype == torch.float32
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert has_bn == (norm == "bn")


def test_process_age_counts_from_the_process_start():
    age = process_age()
    assert 0 < age < 24 * 3600 and math.isfinite(age)


def test_the_weight_average_follows_its_warm_up_and_decay():
    import torch

    from bnlab.lab.speedrun.worker import _Averaged

    net = build_model(RECIPES["bn"].replace(bf16=False))
    avg = _Averaged(net, 0.99)
    before = {k: v.clone() for k, v in avg.model.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    live = {k: v.clone() for k, v in net.state_dict().items()}
    avg.update(0)  # decay min(0.99, 1/10): mostly the live weights
    for k, v in avg.model.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.1 * before[k] + 0.9 * live[k])
        else:  # counters are not averaged
            assert torch.equal(v, before[k])
    mid = {k: v.clone() for k, v in avg.model.state_dict().items()}
    avg.update(10_000)  # the full decay
    for k, v in avg.model.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.99 * mid[k] + 0.01 * live[k])
    assert not avg.model.training
    assert all(not p.requires_grad or p.grad is None for p in avg.model.parameters())


@pytest.mark.parametrize("ema", [-0.1, 1.0, float("nan")])
def test_a_weight_average_outside_0_1_is_refused(ema):
    with pytest.raises(ValueError, match="ema must be in \\[0, 1\\)"):
        RECIPES["bn"].replace(ema=ema)
