"""Corruptions (pure, seeded, monotone in severity) and a tiny run of the shift benchmark."""

from __future__ import annotations

import json

import pytest
import torch

from bnlab.tools import corruptions as C
from bnlab.tools.shift import ShiftConfig, _read_idx, format_table, load_fashion_mnist, run


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


def test_idx_reader_validates(tmp_path):
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert set(y.unique().tolist()) == set(range(10)) and 0 <= float(x.min()) < float(x.max())
    bad = tmp_path / "bad-idx1-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")
    with pytest.raises(ValueError, match="expected 5 values"):
        _read_idx(bad)


def test_tiny_shift_benchmark_runs_on_real_data():
    cfg = ShiftConfig(train_size=640, test_size=192, epochs=1, batch_size=64,
                      corruptions=("contrast",), severities=(5,))
    result = run(cfg, log=lambda *_: None)
    rows = {(r["corruption"], r["severity"]): r for r in result["rows"]}
    assert set(rows) == {("clean", 0), ("contrast", 5)}
    for r in rows.values():
        assert all(0.0 <= r[k] <= 1.0 for k in ("source", "adabn", "tent"))
    assert rows["clean", 0]["adabn"] > 0.3  # a trained model, far above chance (0.1)
    assert "| contrast | 5 |" in format_table(result)
    json.dumps(result)  # serialisable as the run's summary
