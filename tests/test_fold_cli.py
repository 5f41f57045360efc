"""`bnlab fold` and `bnlab lint` on the command line, with a factory file and a checkpoint."""

from __future__ import annotations

import json

import torch

from bnlab.lab.cli import main
from bnlab.tools import load_folded

FACTORY = '''
import torch
from torch import nn

def make():
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.BatchNorm1d(144), nn.Linear(144, 3))

def shared():
    bn = nn.BatchNorm2d(4)
    return nn.Sequential(nn.Conv2d(1, 4, 3), bn, nn.Conv2d(4, 4, 3), bn)
'''


def _factory(tmp_path):
    path = tmp_path / "factory_mod.py"
    path.write_text(FACTORY)
    return str(path)


def test_fold_cli_round_trip(tmp_path, capsys):
    spec = f"{_factory(tmp_path)}:make"
    from bnlab.tools._factory import build_model

    torch.manual_seed(0)
    model = build_model(spec)
    for _ in range(3):
        model(torch.randn(8, 1, 8, 8) * 2 + 1)  # non-trivial running statistics
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, ckpt)
    out = tmp_path / "folded.pt"
    assert main(["fold", str(ckpt), "--model", spec, "--out", str(out),
                 "--example-shape", "2,1,8,8"]) == 0
    text = capsys.readouterr().out
    assert "folded 2 BN layer(s) (graph: fx)" in text and "max abs error" in text
    folded = load_folded(out)
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(folded(x), model.eval()(x), atol=1e-5, rtol=1e-5)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules()) == 0


def test_fold_cli_errors(tmp_path, capsys):
    ckpt = tmp_path / "bad.pt"
    torch.save([1, 2], ckpt)
    assert main(["fold", str(ckpt), "--model", f"{_factory(tmp_path)}:make"]) == 2
    assert "expected a state dict" in capsys.readouterr().err
    assert main(["fold", str(ckpt), "--model", "no_colon"]) == 2
    assert "module:callable" in capsys.readouterr().err


def test_lint_cli_exit_codes_and_json(tmp_path, capsys):
    factory = _factory(tmp_path)
    assert main(["lint", f"{factory}:shared", "--json"]) == 1
    found = json.loads(capsys.readouterr().out)
    assert [f["code"] for f in found] == ["BN001"] and found[0]["module"] == "1"
    assert main(["lint", f"{factory}:make", "--example-shape", "16,1,8,8"]) == 0
    assert "0 finding(s), 0 error(s)" in capsys.readouterr().out
    assert main(["lint", f"{factory}:make", "--example-shape", "2,1,8,8"]) == 0
    assert "BN004 warning" in capsys.readouterr().out
    assert main(["lint", f"{factory}:make", "--example-shape", "2,x"]) == 2


def test_load_folded_refuses_what_it_cannot_rebuild(tmp_path):
    import pytest
    from torch import nn

    from bnlab.tools import fold
    from bnlab.tools.fold import folded_checkpoint

    spec = f"{_factory(tmp_path)}:make"
    from bnlab.tools._factory import build_model

    folded = fold(build_model(spec).eval(), torch.randn(2, 1, 8, 8))
    path = tmp_path / "f.pt"
    torch.save(folded_checkpoint(folded, spec, (2, 1, 8, 8)), path)
    assert torch.load(path, weights_only=True)["example_shape"] == [2, 1, 8, 8]
    # the factory given at load time builds a model whose BN sits elsewhere
    with pytest.raises(ValueError, match="folds differently"):
        load_folded(path, lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)))
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {}}, plain)
    with pytest.raises(ValueError, match="not a bnlab.folded.v1 file"):
        load_folded(plain)
    with pytest.raises(ValueError, match="folded must be a model returned by fold"):
        folded_checkpoint(nn.Linear(2, 2), spec)
