"""What one small layer call costs, counted in instructions instead of seconds: a BN layer's
training forward+backward, ``bnlab.convert(layer)`` against torch's layer, under valgrind's
callgrind (deterministic: a count does not move with the load of a shared machine, where a
1% timing difference is below the noise).

For each contender and shape, two runs of the same script, ``--calls`` and ``5 x --calls``
calls; the difference over the extra calls is the cost of one call (interpreter start, imports
and warm-up cancel out). One thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``,
``OPENBLAS_NUM_THREADS=1``) so no idle pool thread adds counts. Needs ``valgrind`` on PATH;
each run takes about a minute (the interpreter starts under callgrind).

    python bench/bench_instructions.py [--calls 200] [--shapes 2,4,2,2 60,100]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402

_CALLS = r"""
import sys, torch, bnlab
torch.set_num_threads(1)
kind, n = sys.argv[1], int(sys.argv[2])
shape = tuple(int(s) for s in sys.argv[3].split(","))
cls = torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d
layer = cls(shape[1])
if kind == "bnlab":
    layer = bnlab.convert(layer)
x = torch.randn(shape, requires_grad=True)
g = torch.randn(shape)
for _ in range(3):
    layer(x).backward(g)
for _ in range(n):
    layer(x).backward(g)
"""


def instructions(kind: str, calls: int, shape: str, workdir: Path) -> int:
    """Instructions callgrind counted for the whole run of ``calls`` calls."""
    script = workdir / "calls.py"
    script.write_text(_CALLS)
    out = workdir / f"cg.{kind}.{calls}"
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    run = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
         str(script), kind, str(calls), shape],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    found = re.search(r"Collected\s*:\s*(\d+)", run.stderr)
    if found is None:
        raise RuntimeError(f"callgrind printed no count:\n{run.stderr[-2000:]}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--shapes", nargs="+", default=["2,4,2,2", "60,100"])
    args = p.parse_args(argv)
    if args.calls < 1:
        p.error(f"--calls must be >= 1, got {args.calls}")
    if shutil.which("valgrind") is None:
        print("valgrind is not on PATH: nothing measured (apt-get install valgrind)")
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for shape in args.shapes:
            per_call = {}
            for kind in ("torch", "bnlab"):
                few = instructions(kind, args.calls, shape, work)
                many = instructions(kind, 5 * args.calls, shape, work)
                per_call[kind] = (many - few) / (4 * args.calls)
            ratio = per_call["bnlab"] / per_call["torch"]
            rows.append({"shape": [int(s) for s in shape.split(",")],
                         "torch_instructions": per_call["torch"],
                         "bnlab_instructions": per_call["bnlab"], "ratio": ratio})  # fmt: skip
            print(f"one call fwd+bwd ({shape}): bnlab {per_call['bnlab']:,.0f} instructions, "
                  f"torch {per_call['torch']:,.0f}: bnlab/torch {ratio:.3f}", flush=True)
    _timing.write_json("bench_instructions", {"machine": _timing.machine(), "calls": args.calls,
                                              "rows": rows})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
