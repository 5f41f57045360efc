"""Distributed data-parallel training with the same trainer: ``bnlab train --nproc-per-node N``.

The command line starts ``N`` copies of ``python -m bnlab.lab.train.ddp`` through torchrun
(:func:`bnlab.lab.distributed.launch`). Each worker initialises its process group from torchrun's
environment (:func:`bnlab.lab.distributed.init_from_env`: gloo on CPU, NCCL on GPU, every
collective bounded by ``--timeout`` seconds) and calls :func:`train_rank`, the lab's one DDP
training entry (the example worker, :mod:`bnlab.lab.distributed.worker`, calls it too), which
runs :func:`bnlab.lab.train.train` with a :class:`bnlab.lab.train.replicas.Replicas` context:

* the seeded global batch order of each epoch (:func:`bnlab.lab.data.batch_order`, the same on
  every rank) is split into per-rank shards ``idx[rank::world]`` (as ``DistributedSampler``
  does), so ``batch_size`` stays the *global* batch and the run visits the same examples per
  step as a single-process run;
* the model is wrapped with :func:`bnlab.lab.distributed.wrap_ddp` (``sync_bn=True`` converts its
  BN layers to :class:`bnlab.SyncBatchNorm`, whose statistics cover the global batch);
* per-step loss, hits and the Ctrl-C flag are summed over the ranks (one small all-reduce), so
  the metrics are global and every rank stops at the same step;
* :func:`bnlab.lab.distributed.sync_running_stats` averages the running statistics before every
  evaluation and checkpoint; only rank 0 evaluates and writes the run directory.

A rank that crashes makes the others fail within the timeout; each prints why and exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["launch_train", "train_rank", "main"]


def launch_train(config: Any, out: str | os.PathLike, *, resume: bool = False,
                 timeout_s: float = 120.0, dump_states: str | None = None,
                 quiet: bool = False, env: dict[str, str] | None = None) -> int:
    """Start ``config.nproc_per_node`` workers training ``config`` into ``out``; exit status.

    ``dump_states`` (a folder) makes every rank save its final parameters and buffers as
    ``rank{R}.pt`` there (for checks that the replicas agree).
    """
    from ..distributed import launch

    with tempfile.TemporaryDirectory(prefix="bnlab-ddp-") as tmp:
        cfg_path = Path(tmp) / "config.toml"
        cfg_path.write_text(config.to_toml())
        args = ["--config", str(cfg_path), "--out", str(out), "--timeout", str(timeout_s)]
        args += ["--resume"] if resume else []
        args += ["--quiet"] if quiet else []
        args += ["--dump-states", str(dump_states)] if dump_states else []
        return launch(config.nproc_per_node, "bnlab.lab.train.ddp", args, env=env)


def train_rank(info: Any, config: Any, out: str | os.PathLike, *, resume: bool = False,
               quiet: bool = False, dump_states: str | os.PathLike | None = None,
               on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """This rank's part of a data-parallel run: the trainer (:func:`bnlab.lab.train.train`)
    with a :class:`~bnlab.lab.train.replicas.Replicas` context, every step through
    :func:`~bnlab.lab.train.step.train_step`. The one DDP training entry of the lab:
    ``python -m bnlab.lab.train.ddp`` (``bnlab train --nproc-per-node N``) and the example
    worker (``python -m bnlab.lab.distributed.worker``) both end here.

    ``info`` is what :func:`bnlab.lab.distributed.init_from_env` returned; ``dump_states`` (a
    folder) gets this rank's final parameters and buffers as ``rank{R}.pt``; ``on_step`` is the
    trainer's (called with the global step after every step). Progress is shown by rank 0
    only, and not at all with ``quiet``. Returns what the trainer returns: the run's summary
    on rank 0, this rank's status on the others.
    """
    from .loop import train
    from .progress import make_progress
    from .replicas import Replicas

    if info.world_size != config.nproc_per_node:
        raise ValueError(f"nproc_per_node={config.nproc_per_node} but torchrun started "
                         f"{info.world_size} ranks")

    def dump(model: nn.Module) -> None:
        if dump_states:
            Path(dump_states).mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            torch.save(state, Path(dump_states) / f"rank{info.rank}.pt")

    progress = make_progress(quiet or not info.is_main)
    try:
        return train(config, out, resume=resume, progress=progress, replicas=Replicas(info),
                     on_step=on_step, on_end=dump)
    finally:
        progress.close()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bnlab.lab.train.ddp",
                                description="one rank of bnlab train --nproc-per-node N")
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--dump-states", default=None)
    return p.parse_args(argv)


def _run(args: argparse.Namespace) -> None:
    from ..distributed import init_from_env
    from .config import TrainConfig

    config = TrainConfig.from_toml(args.config)
    info = init_from_env(timeout_s=args.timeout)
    train_rank(info, config, args.out, resume=args.resume, quiet=args.quiet,
               dump_states=args.dump_states)


def main(argv: list[str] | None = None) -> int:
    from ..distributed import run_rank

    args = _parse(argv)
    return run_rank("bnlab train", lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
