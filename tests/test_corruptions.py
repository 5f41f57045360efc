"""Corruptions (pure, seeded, monotone in severity) and a tiny run of the shift benchmark."""

from __future__ import annotations

import json

import pytest
import torch

from bnlab.lab.models import small_cnn
from bnlab.lab.studies.corruption_benchmark import (
    ShiftConfig,
    format_table,
    main,
    run,
    train_source,
)
from bnlab.tools import corruptions as C


def _images():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(6, 1, 28, 28)
    x[:, :, 6:22, 8:20] = torch.rand(6, 1, 16, 12, generator=g) * 0.6 + 0.4
    return x


@pytest.mark.parametrize("name", C.corruption_names())
def test_corruption_is_pure_seeded_bounded_and_monotone(name):
    x = _images()
    keep = x.clone()
    dist = []
    for s in range(1, 6):
        y = C.corrupt(x, name, s, seed=3)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert float(y.min()) >= 0 and float(y.max()) <= 1
        assert torch.equal(y, C.corrupt(x, name, s, seed=3))  # seeded: same call, same result
        dist.append(float((y - x).abs().mean()))
    assert torch.equal(x, keep)  # the input is not modified
    assert all(b > a for a, b in zip(dist, dist[1:], strict=False)), dist
    assert dist[0] > 1e-3


def test_random_corruptions_depend_on_seed_and_validate():
    x = _images()
    assert not torch.equal(C.gaussian_noise(x, 2, seed=0), C.gaussian_noise(x, 2, seed=1))
    assert torch.equal(C.contrast(x, 2, seed=0), C.contrast(x, 2, seed=1))
    with pytest.raises(ValueError, match="severity must be an int from 1 to 5, got 6"):
        C.brightness(x, 6)
    with pytest.raises(ValueError, match="unknown corruption 'fog'; valid names: brightness"):
        C.corrupt(x, "fog", 1)
    with pytest.raises(TypeError, match="floating-point tensor"):
        C.pixel_dropout(torch.zeros(2, 28, 28, dtype=torch.uint8))
    # contrast keeps each image's mean; blur keeps the total intensity away from borders
    torch.testing.assert_close(C.contrast(x, 5).mean(dim=(-2, -1)), x.mean(dim=(-2, -1)))
    torch.testing.assert_close(C.gaussian_blur(x, 3).sum(), x.sum(), rtol=1e-4, atol=0)


def test_source_model_is_the_shared_small_cnn_with_torch_bn_after_relu():
    x = torch.rand(128, 1, 28, 28)
    y = torch.randint(0, 10, (128,))
    cfg = ShiftConfig(epochs=1, batch_size=64)
    trained = train_source(x, y, cfg)
    kinds = [type(m).__name__ for m in trained]
    assert kinds[:4] == ["Conv2d", "ReLU", "BatchNorm2d", "MaxPool2d"]
    assert isinstance(trained[2], torch.nn.BatchNorm2d) and not trained.training
    # same init as the shared model: training starts from small_cnn("torch-bn") under the seed
    torch.manual_seed(cfg.seed)
    fresh = small_cnn("torch-bn")
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in trained.parameters()]
    before = ShiftConfig(epochs=1, batch_size=64, placement="before", norm="bn")
    kinds = [type(m).__name__ for m in train_source(x, y, before)][:3]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU"]


def test_tiny_shift_benchmark_runs_on_real_data(tmp_path, capsys):
    cfg = ShiftConfig(train_size=640, test_size=192, epochs=1, batch_size=64,
                      corruptions=("contrast",), severities=(5,))
    result = run(cfg, log=lambda *_: None)
    rows = {(r["corruption"], r["severity"]): r for r in result["rows"]}
    assert set(rows) == {("clean", 0), ("contrast", 5)}
    for r in rows.values():
        assert all(0.0 <= r[k] <= 1.0 for k in ("source", "adabn", "tent"))
    assert rows["clean", 0]["adabn"] > 0.3  # a trained model, far above chance (0.1)
    assert "| contrast | 5 |" in format_table(result)
    (tmp_path / "in.json").write_text(json.dumps(result))  # serialisable as the summary
    # the report is derived from shift.json alone
    assert main(["--report-from", str(tmp_path / "in.json"), "--out", str(tmp_path / "o")]) == 0
    md = (tmp_path / "o" / "report.md").read_text()
    m = result["mean_over_corruptions"]
    assert f"| contrast | 5 | {rows['contrast', 5]['source']:.4f} |" in md
    assert f"TENT {m['tent']:.4f}" in md and "![Test accuracy" in md
    page = (tmp_path / "o" / "report.html").read_text()
    assert 'id="fig-shift" ' in page and "data:image/png;base64," in page
    assert "<td>mean (corrupted)</td>" in page and "src=\"http" not in page
    assert (tmp_path / "o" / "report-files" / "shift.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "o" / "shift.json").read_text()) == json.loads(json.dumps(result))
