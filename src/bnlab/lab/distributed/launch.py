"""Start ``N`` worker processes on this machine through ``torch.distributed.run`` (torchrun)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

__all__ = ["torchrun_command", "launch"]


def torchrun_command(
    nproc_per_node: int,
    module: str = "bnlab.lab.distributed.worker",
    args: Sequence[str] = (),
) -> list[str]:
    """The torchrun command line that runs ``python -m module *args`` on ``nproc_per_node``
    local processes with a standalone rendezvous (a free local port, no other setup)."""
    n = nproc_per_node
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(
            f"launch: nproc_per_node must be a positive int, got {nproc_per_node!r}"
        )
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc_per_node),
        "--max-restarts", "0", "--monitor-interval", "0.2",
        "-m", module, *args,
    ]


def launch(
    nproc_per_node: int,
    module: str = "bnlab.lab.distributed.worker",
    args: Sequence[str] = (),
    *,
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
) -> int:
    """Run :func:`torchrun_command` and return its exit status.

    Each worker gets ``OMP_NUM_THREADS = max(1, cores // nproc_per_node)`` unless already set,
    so ``N`` processes do not oversubscribe the CPU. torchrun stops every worker as soon as one
    fails and exits non-zero. ``timeout_s`` bounds the whole run (the process group is killed
    and ``subprocess.TimeoutExpired`` raised).
    """
    cmd = torchrun_command(nproc_per_node, module, args)
    full_env = dict(os.environ if env is None else env)
    full_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    proc = subprocess.Popen(cmd, env=full_env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        raise
