"""Distributed data-parallel training helpers: launch through torchrun, initialise a worker
from the environment, wrap a model in DDP (optionally with :class:`bnlab.SyncBatchNorm`),
and average running statistics across ranks before evaluation and checkpoints.

``python -m bnlab.lab.distributed.worker`` is the example worker: the lab's small CNN trained by
the trainer on every rank (a thin front end of :func:`bnlab.lab.train.ddp.train_rank`, the one
DDP training entry); :func:`launch` starts ``N`` copies of it (or any module) through
``torch.distributed.run``.
"""

from __future__ import annotations

from .launch import launch, torchrun_command
from .runtime import (
    DistInfo,
    RankFailure,
    bn_layers,
    cleanup,
    init_from_env,
    run_rank,
    sync_running_stats,
    wrap_ddp,
)

__all__ = [
    "DistInfo",
    "RankFailure",
    "bn_layers",
    "cleanup",
    "init_from_env",
    "launch",
    "run_rank",
    "sync_running_stats",
    "torchrun_command",
    "wrap_ddp",
]
