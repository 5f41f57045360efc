"""Start small multi-process jobs for the distributed tests, always with a timeout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import bnlab

SRC = str(Path(bnlab.__file__).resolve().parents[1])


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([SRC, str(Path(__file__).parent), e.get("PYTHONPATH", "")])
    e["OMP_NUM_THREADS"] = "1"
    return e


def run_ranks(script: Path, world: int, args: list[str], timeout: float = 120.0) -> list[str]:
    """Run ``python script rank world *args`` for every rank; return each rank's stderr.

    Every process is killed if the group has not finished within ``timeout`` seconds, so a
    deadlock fails the test instead of hanging it.
    """
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), str(world), *args],
            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for r in range(world)
    ]
    errs = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            errs.append(err)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    assert codes == [0] * world, f"rank exit codes {codes}; stderr:\n" + "\n".join(errs)
    return errs
