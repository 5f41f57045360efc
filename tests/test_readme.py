"""Every Python example in the README runs as written; every command line in it parses.

The README's examples are fragments of a user's program: they use the user's model, data
loaders, process group or Keras layer. Each example gets those objects here (small, but real
torch modules and loaders) and then runs exactly as the README prints it, so a renamed or
moved function, a changed argument or a wrong claim in a comment fails a test. A new example
needs an entry in ``SETUP``; an example without one fails.

The distributed example also runs for real: its ``launch`` line starts two torchrun ranks of
bnlab's worker, and the lines meant for "your own worker module" are written into such a
module and launched the same way.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
WORKER_MARK = "# inside your own worker module:"


def fenced(language: str) -> list[str]:
    """The README's code blocks fenced as ``language``."""
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def python_examples() -> list[str]:
    return fenced("python")


# The user's objects each example refers to, keyed by a line that identifies the example.
_MODEL = """
import torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Flatten(), nn.Linear(8 * 26 * 26, 10))
"""
_LOADERS = _MODEL + """
import bnlab
g = torch.Generator().manual_seed(0)
batches = [(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g))
           for _ in range(200)]  # recalibrate's example asks for 200
train_loader, test_loader = batches, [x for x, _ in batches[:4]]
xb = batches[0][0]
opt = torch.optim.SGD(model.parameters(), lr=0.01)
def train(model):
    model.train()
    for step in range(60):
        x, y = batches[step % len(batches)]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
"""
SETUP = {
    "bn = bnlab.BatchNorm2d(32)  ": """
from torch import nn
torch_model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
""",
    "from bnlab.keras import": """
import numpy as np
import bnlab
class KerasBatchNormalization:  # what keras.layers.BatchNormalization.get_weights() returns
    def get_weights(self):
        r = np.random.default_rng(0)
        return [r.uniform(0.5, 2, 32), r.normal(size=32), r.normal(size=32),
                r.uniform(0.5, 2, 32)]
keras_layer = KerasBatchNormalization()
""",
    "bnlab.BatchRenorm2d(32": _MODEL,
    "model = bnlab.SyncBatchNorm.convert_sync_batchnorm": _MODEL + """
import bnlab
group = None  # a torch.distributed process group; None is this process alone
""",
    "from bnlab.lab.distributed import": "",
    "with bnlab.accumulation(model):": "",
    "bnlab.kernels.backend()": "import torch\nx = torch.randn(8, 32, 6, 6)\n",
    'layer = bnlab.BatchNormAct2d(64, act="leaky_relu", inplace=True)': "import bnlab\n",
    "from bnlab.tools import fold, recalibrate": _LOADERS,
    "bn = bnlab.MaskedBatchNorm1d(": "",  # self-contained
    "pn = bnlab.PowerNorm(": "",  # self-contained
}


def _setup_for(example: str) -> str:
    keys = [k for k in SETUP if k in example]
    assert len(keys) == 1, f"README example without exactly one SETUP entry:\n{example}"
    return SETUP[keys[0]]


def test_every_readme_example_has_a_setup() -> None:
    examples = python_examples()
    assert len(examples) >= 8
    used = {k for e in examples for k in SETUP if k in e}
    assert used == set(SETUP), f"SETUP entries matching no README example: {set(SETUP) - used}"
    for e in examples:
        _setup_for(e)


# the distributed example runs in test_readme_distributed_example
@pytest.mark.parametrize("index", [i for i, e in enumerate(python_examples())
                                   if WORKER_MARK not in e])
def test_readme_example_runs(index: int, tmp_path, monkeypatch) -> None:
    import torch

    example = python_examples()[index]
    monkeypatch.chdir(tmp_path)  # examples that write files (monitor.png) write here
    ns: dict = {}
    torch.manual_seed(0)
    exec(compile(_setup_for(example), f"<setup of README example {index}>", "exec"), ns)
    exec(compile(example, f"<README example {index}>", "exec"), ns)
    if "fold_report" in example:  # the tools example: what its comments say happened
        assert ns["fast"].fold_report.folded == [("1", "0", "into previous")]
        assert isinstance(ns["tent"], ns["Tent"])
        assert ns["rows"] and (tmp_path / "monitor.png").stat().st_size > 0


def test_readme_distributed_example(tmp_path, monkeypatch) -> None:
    """Its ``launch`` line trains two ranks; its worker lines run inside a torchrun worker."""
    from tests._dist_util import env

    example = next(e for e in python_examples() if WORKER_MARK in e)
    head, worker = example.split(WORKER_MARK)
    monkeypatch.chdir(tmp_path)
    # launch() passes os.environ to torchrun: the workers find bnlab, the tests' helpers and
    # the worker module written below, one thread each
    e = env()
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{e['PYTHONPATH']}")
    monkeypatch.setenv("OMP_NUM_THREADS", e["OMP_NUM_THREADS"])
    ns: dict = {}
    # the launch line, as printed, with the launcher's exit status captured
    launch_line = next(line for line in head.splitlines() if line.startswith("launch("))
    exec(compile(head.replace(launch_line, "rc = " + launch_line), "<README launch>", "exec"),
         ns)
    assert ns["rc"] == 0
    run = tmp_path / "runs" / "ddp"  # the trainer's run directory, rank 0's
    assert json.loads((run / "environment.json").read_text())["world_size"] == 2
    assert "sync_bn = true" in (run / "config.toml").read_text().splitlines()
    assert json.loads((run / "summary.json").read_text())["status"] == "complete"
    # the lines for "your own worker module", in a worker module of a user's
    (tmp_path / "readme_worker.py").write_text(
        head.splitlines()[0] + "\n" + textwrap.dedent("""
            import json, torch
            from torch import nn
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
        """) + worker.replace("...", textwrap.dedent("""\
            gen = torch.Generator().manual_seed(info.rank)
            for _ in range(3):
                ddp(torch.randn(6, 4, generator=gen) * (1 + info.rank)).sum().backward()
            """)) + textwrap.dedent("""
            bn = ddp.module[1]
            out = {"rank": info.rank, "world": info.world_size, "mean": bn.running_mean.tolist()}
            with open(f"rank{info.rank}.json", "w") as f:
                json.dump(out, f)
        """))
    ns = {}
    exec(compile(head.splitlines()[0] + "\nrc = launch(2, 'readme_worker', [], timeout_s=120)",
                 "<launch of the README worker>", "exec"), ns)
    assert ns["rc"] == 0
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["world"], r1["world"]) == (2, 2)
    # the ranks saw different data; sync_running_stats made their statistics agree
    assert r0["mean"] == pytest.approx(r1["mean"], abs=1e-6)
    assert any(abs(m) > 1e-3 for m in r0["mean"])


def shell_lines() -> list[str]:
    """The README's shell command lines (continuations joined, comments dropped)."""
    lines = []
    for block in fenced("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line:
                lines.append(line)
    return lines


def test_readme_bnlab_commands_parse() -> None:
    """Every ``bnlab ...`` line of the README is accepted by bnlab's own argument parser
    (parsed, not run: the long ones train for minutes)."""
    import shlex

    from bnlab.lab.cli import build_parser

    commands = [ln for ln in shell_lines() if ln.startswith("bnlab ")]
    assert len(commands) >= 20
    parser = build_parser()
    for line in commands:
        argv = [a for a in shlex.split(line)[1:] if a != "..."]  # "..." elides repeated flags
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # argparse's way of refusing
            raise AssertionError(f"README command refused by the parser: {line}") from e
        assert callable(getattr(args, "func", None)), line


def test_readme_bench_commands_name_real_scripts_and_flags() -> None:
    import shlex
    import subprocess
    import sys

    root = README.parent
    commands = [shlex.split(ln) for ln in shell_lines()
                if re.match(r"(\.venv/bin/)?python3? bench/", ln)]
    assert len(commands) >= 4
    for argv in commands:
        script = root / argv[1]
        assert script.is_file(), argv
        help_text = subprocess.run([sys.executable, str(script), "--help"], cwd=root,
                                   capture_output=True, text=True, timeout=120).stdout
        for flag in (a for a in argv[2:] if a.startswith("--")):
            assert flag in help_text, f"{argv[1]} has no {flag} (README: {' '.join(argv)})"
