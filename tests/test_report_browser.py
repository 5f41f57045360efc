"""report.html opened in headless Chromium: every plot decodes and is drawn on the page."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from bnlab.lab.data import Dataset
from bnlab.lab.report import write_report
from bnlab.lab.train import TrainConfig, train

WINDOW = (1100, 4200)
PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.querySelectorAll('img.plot')].map(i => {
    const r = i.getBoundingClientRect();
    return {id: i.id, w: i.naturalWidth, h: i.naturalHeight, complete: i.complete,
            x: r.left, y: r.top, width: r.width, height: r.height};
  });
  const pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify(imgs);
  document.body.appendChild(pre);
});
</script></body>"""


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("Chromium is needed for this test: apt-get install chromium (make setup)")
    return exe


def _browse(html_path, *extra) -> subprocess.CompletedProcess:
    cmd = [_chromium(), "--headless", "--disable-gpu", "--hide-scrollbars",
           f"--window-size={WINDOW[0]},{WINDOW[1]}", "--virtual-time-budget=5000", *extra,
           html_path.as_uri()]
    if os.geteuid() == 0:
        cmd.insert(1, "--no-sandbox")  # Chromium refuses to sandbox as root
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


def _colored(pixels: np.ndarray) -> int:
    """Pixels with a clear hue (plot lines, bars, bands), not black/grey/white text."""
    rgb = pixels[..., :3].astype(int)
    return int(((rgb.max(-1) - rgb.min(-1)) > 60).sum())


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (320,), generator=g)
    x = torch.rand(320, 1, 28, 28, generator=g) * 0.5
    for c in range(10):
        x[y == c, :, 2 * c : 2 * c + 6, 4:20] += 0.5
    data = Dataset("synthetic", x[:256], y[:256], x[256:], y[256:], "synthetic tensors")
    for norm in ("none", "bn"):
        for seed in (0, 1):
            cfg = TrainConfig(norm=norm, seed=seed, epochs=3, batch_size=64, threads=1)
            train(cfg, root / "runs" / f"{norm}-s{seed}", dataset=data)
    return write_report([root]).html


def test_report_html_is_self_contained(report):
    text = report.read_text()
    srcs = re.findall(r'<img[^>]* src="([^"]*)"', text)
    assert len(srcs) == 5 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r'(src|href)="(?!data:)', text)  # nothing fetched from elsewhere


def test_plots_decode_and_render_in_chromium(report, tmp_path):
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("</body>", PROBE))
    dom = _browse(probe, "--dump-dom").stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    imgs = json.loads(found.group(1).replace("&quot;", '"'))
    assert [i["id"] for i in imgs] == ["fig-accuracy", "fig-loss", "fig-gap", "fig-steps",
                                       "fig-time"]
    for i in imgs:
        assert i["complete"] and i["w"] > 300 and i["h"] > 150, i  # the PNG decoded

    shot = tmp_path / "shot.png"
    _browse(report, f"--screenshot={shot}")
    page = np.asarray(Image.open(shot).convert("RGB"))
    assert page.shape[:2] == (WINDOW[1], WINDOW[0])
    for i in imgs:
        assert i["y"] + i["height"] <= WINDOW[1], f"{i['id']} below the screenshot"
        top, left = int(i["y"]), int(i["x"])
        region = page[top : top + int(i["height"]), left : left + int(i["width"])]
        assert _colored(region) > 300, f"{i['id']}: no coloured plot pixels where it should be"
        assert region.std() > 20, f"{i['id']}: region is flat"

    # The same page with the image data removed has (almost) no coloured pixels there: the
    # colour comes from the plots, not from the page's style.
    blank = tmp_path / "blank.html"
    blank.write_text(re.sub(r'src="data:image/png;base64,[^"]*"', 'src=""', report.read_text()))
    shot_blank = tmp_path / "blank.png"
    _browse(blank, f"--screenshot={shot_blank}")
    empty = np.asarray(Image.open(shot_blank).convert("RGB"))
    assert _colored(page) > _colored(empty) + 20000
