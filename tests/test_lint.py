"""bnlab.tools.lint: one model per mistake, each must be found; a clean model finds nothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import bnlab
from bnlab.tools import Finding, lint, lint_source


def _codes(findings):
    return [(f.code, f.severity, f.module) for f in findings]


def _clean(bn=nn.BatchNorm2d):
    return nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), bn(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 36, 10))


def test_clean_model_has_no_findings():
    for bn in (nn.BatchNorm2d, bnlab.BatchNorm2d):
        model = _clean(bn)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        assert lint(model, torch.randn(16, 1, 8, 8), opt) == []


def _seed_bug():
    bn = nn.BatchNorm2d(32)  # the seed passes one layer after the 32- and the 64-channel conv
    return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), bn, nn.MaxPool2d(2),
                         nn.Conv2d(32, 32, 3), nn.ReLU(), bn, nn.MaxPool2d(2))


def test_bn001_shared_layer_found_by_hooks_and_by_fx():
    model = _seed_bug()
    hooks = lint(model, torch.randn(16, 1, 28, 28))
    assert ("BN001", "error", "2") in _codes(hooks)
    assert "called 2 times per forward (found with forward hooks)" in hooks[0].message
    static = lint(model)
    assert _codes(static) == [("BN001", "error", "2")]
    assert "fx" in static[0].message
    # the seed's real bug: channel counts differ, so the forward itself fails -> BN000
    bn = nn.BatchNorm2d(32)
    real = nn.Sequential(nn.Conv2d(1, 32, 3), bn, nn.Conv2d(32, 64, 3), bn)
    found = lint(real, torch.randn(4, 1, 12, 12))
    assert [f.code for f in found][:1] == ["BN001"]
    assert any(f.code == "BN000" and "RuntimeError" in f.message for f in found)


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.bn = bnlab.BatchNorm1d(6)
        self.bn2 = nn.BatchNorm1d(6)

    def forward(self, x):
        y = self.bn(self.fc(x))
        return self.bn2(F.dropout(y, 0.5, self.training))


def test_bn002_bias_and_bn003_dropout_via_sequential_and_fx():
    seq = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.2), nn.BatchNorm2d(4))
    assert _codes(lint(seq)) == [("BN002", "warning", "1"), ("BN003", "warning", "3")]
    func = lint(_Functional())
    assert _codes(func) == [("BN002", "warning", "bn"), ("BN003", "warning", "bn2")]
    assert "function dropout" in func[1].message


def test_bn004_small_and_single_value_batches():
    small = lint(_clean(), torch.randn(2, 1, 8, 8))
    assert _codes(small) == [("BN004", "warning", "1")]
    one = nn.Sequential(nn.Linear(3, 4, bias=False), nn.BatchNorm1d(4))
    assert _codes(lint(one, torch.randn(1, 3))) == [("BN004", "error", "1")]
    assert lint(one.eval(), torch.randn(1, 3)) == []  # evaluation batches can be any size


def test_bn005_keras_momentum_and_bn009_half_eps():
    m = nn.Sequential(nn.BatchNorm1d(3, momentum=0.99), bnlab.BatchNorm1d(3, momentum=0.1))
    assert _codes(lint(m)) == [("BN005", "warning", "0")]
    cumulative = bnlab.BatchNorm1d(3, momentum=0.99, running="cumulative")
    assert lint(nn.Sequential(cumulative)) == []
    half = nn.Sequential(nn.BatchNorm1d(3, eps=1e-5).half(), nn.BatchNorm1d(3, eps=1e-3).half())
    assert _codes(lint(half)) == [("BN009", "warning", "0")]


def test_bn006_nonfinite_statistics():
    model = _clean(bnlab.BatchNorm2d)
    model[1].running_var[2] = float("nan")
    found = lint(model)
    assert _codes(found) == [("BN006", "error", "1")]
    assert found[0].why and found[0].fix and isinstance(found[0], Finding)


def test_bn007_weight_decay_on_bn_parameters():
    model = _clean()
    decay_all = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    assert _codes(lint(model, optimizer=decay_all)) == [("BN007", "warning", "1")]
    bn_params = list(model[1].parameters())
    others = [p for n, p in model.named_parameters() if not n.startswith("1.")]
    split = torch.optim.SGD([{"params": others, "weight_decay": 5e-4},
                             {"params": bn_params, "weight_decay": 0.0}], lr=0.1)
    assert lint(model, optimizer=split) == []


def test_bn008_mixed_modes_and_bn010_frozen_but_updating():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3), nn.BatchNorm1d(3))
    model[1].eval()
    assert _codes(lint(model)) == [("BN008", "warning", "1")]
    frozen = nn.Sequential(nn.BatchNorm1d(3))
    frozen.requires_grad_(False)
    assert _codes(lint(frozen)) == [("BN010", "warning", "0")]
    assert lint(frozen.eval()) == []


def test_lint_leaves_model_untouched():
    model = _clean()
    model[1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lint(model, torch.randn(3, 1, 8, 8))
    assert model.training and not model[1].training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(not m._forward_pre_hooks for m in model.modules())


# --- BN011: torch's converter in the source (it leaves nothing to see in the model) -------

_TORCH_CALLS = {
    "import torch\nm = torch.nn.SyncBatchNorm.convert_sync_batchnorm(m)\n": 2,
    "from torch import nn\n\nm = nn.SyncBatchNorm.convert_sync_batchnorm(m, None)\n": 3,
    "import torch.nn as tnn\nm = tnn.SyncBatchNorm.convert_sync_batchnorm(m)\n": 2,
    "from torch.nn import SyncBatchNorm as S\nm = S.convert_sync_batchnorm(m)\n": 2,
    "from torch.nn.modules.batchnorm import SyncBatchNorm\n"
    "def f(m):\n    return SyncBatchNorm.convert_sync_batchnorm(m)\n": 3,
}


def test_bn011_torch_sync_converter_found_however_imported():
    for source, line in _TORCH_CALLS.items():
        found = lint_source(source, "train.py")
        assert [(f.code, f.severity, f.module) for f in found] == \
            [("BN011", "warning", f"train.py:{line}")], source
        assert "bnlab.SyncBatchNorm.convert_sync_batchnorm" in found[0].fix


def test_bn011_not_raised_for_bnlab_converter_or_other_names():
    for source in (
        "import bnlab\nm = bnlab.SyncBatchNorm.convert_sync_batchnorm(m)\n",
        "from bnlab import SyncBatchNorm\nm = SyncBatchNorm.convert_sync_batchnorm(m)\n",
        "from torch import nn\nx = nn.SyncBatchNorm(8)\n",  # building one is fine
        "m = SyncBatchNorm.convert_sync_batchnorm(m)\n",  # unknown origin: not guessed
    ):
        assert lint_source(source) == [], source


def test_bn011_what_it_warns_about_is_real():
    """torch's converter really does drop a window and a fused activation (the reason for
    the rule), while bnlab's keeps them."""
    model = nn.Sequential(bnlab.BatchNorm2d(4, running="window", window_size=3),
                          bnlab.BatchNormAct2d(4, act="relu"))
    by_torch = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert [type(m) for m in by_torch] == [nn.SyncBatchNorm, nn.SyncBatchNorm]
    model = nn.Sequential(bnlab.BatchNorm2d(4, running="window", window_size=3),
                          bnlab.BatchNormAct2d(4, act="relu"))
    by_bnlab = bnlab.SyncBatchNorm.convert_sync_batchnorm(model)
    assert by_bnlab[0].running == "window" and by_bnlab[1].act == "relu"


def test_lint_source_bad_input():
    import pytest

    with pytest.raises(ValueError, match="train.py is not valid Python"):
        lint_source("def f(:\n", "train.py")
    with pytest.raises(TypeError, match="source must be a str"):
        lint_source(b"import torch")


def test_cli_lint_reads_the_factory_source_and_scripts(tmp_path, capsys):
    from bnlab.lab.cli import main

    script = tmp_path / "train.py"
    script.write_text("import torch\nimport bnlab\n\n\ndef make():\n"
                      "    m = torch.nn.Sequential(bnlab.BatchNorm2d(4))\n"
                      "    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(m)\n")
    assert main(["lint", str(script)]) == 0  # warnings only
    out = capsys.readouterr().out
    assert "BN011" in out and f"{script}:7" in out and "1 finding(s), 0 error(s)" in out
    assert main(["lint", f"{script}:make"]) == 0
    out = capsys.readouterr().out
    assert f"{script}:7" in out


# --- BN012: gradient accumulation outside bnlab.accumulation (read from source) -----------

_ACCUMULATING = {
    # the step under an if: backward on line 4 runs k times per step
    "for i, (x, y) in enumerate(loader):\n"
    "    loss = loss_fn(model(x), y)\n"
    "    opt.zero_grad() if i % k == 0 else None\n"
    "    loss.backward()\n"
    "    if (i + 1) % k == 0:\n"
    "        opt.step()\n": [4],
    # a step after an inner loop of micro-batches (amp's scaler included)
    "for xb, yb in loader:\n"
    "    for x, y in zip(xb.chunk(4), yb.chunk(4)):\n"
    "        scaler.scale(loss_fn(model(x), y)).backward()\n"
    "    scaler.step(opt)\n"
    "    scaler.update()\n": [3],
    # loss / accum_steps, however the step is written
    "for epoch in range(3):\n"
    "    for x, y in loader:\n"
    "        loss = loss_fn(model(x), y) / args.accum_steps\n"
    "        loss.backward()\n"
    "        step_if_due(opt)\n": [4],
}


def test_bn012_gradient_accumulation_found():
    for source, lines in _ACCUMULATING.items():
        found = lint_source(source, "train.py")
        assert [(f.code, f.severity, f.module) for f in found] == \
            [("BN012", "warning", f"train.py:{line}") for line in lines], source
        assert "bnlab.accumulation" in found[0].fix and "running" in found[0].why


def test_bn012_not_raised_for_one_backward_per_step_or_inside_the_block():
    for source in (
        # the usual loop: one backward, one step, a scheduler stepping every so often
        "for i, (x, y) in enumerate(loader):\n"
        "    loss_fn(model(x), y).backward()\n"
        "    opt.step()\n"
        "    if i % 100 == 0:\n"
        "        scheduler.step()\n",
        "for epoch in range(3):\n"
        "    for x, y in loader:\n"
        "        loss_fn(model(x), y).backward()\n"
        "        opt.step()\n"
        "    lr_sched.step()\n",
        # accumulation inside the block, however bnlab was imported
        "import bnlab\n"
        "for xb, yb in loader:\n"
        "    with bnlab.accumulation(model):\n"
        "        for x, y in zip(xb.chunk(4), yb.chunk(4)):\n"
        "            (loss_fn(model(x), y) / accum_steps).backward()\n"
        "    opt.step()\n",
        "from bnlab import accumulation as acc\n"
        "while True:\n"
        "    with acc(model):\n"
        "        for x, y in micro_batches():\n"
        "            loss_fn(model(x), y).backward()\n"
        "    opt.step()\n",
    ):
        assert lint_source(source) == [], source


def test_bn012_script_with_both_rules_sorted_by_line():
    source = ("from torch import nn\n"
              "m = nn.SyncBatchNorm.convert_sync_batchnorm(m)\n"
              "for i, x in enumerate(loader):\n"
              "    model(x).mean().backward()\n"
              "    if i % 2:\n"
              "        opt.step()\n")
    assert [(f.code, f.module) for f in lint_source(source, "t.py")] == \
        [("BN011", "t.py:2"), ("BN012", "t.py:4")]
