"""Worker-side helpers: process-group setup with a bounded timeout, DDP wrapping and
running-statistics synchronisation."""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from bnlab.sync import SyncBatchNorm
from bnlab.tools import bn_layers  # (name, layer) pairs, as everywhere in bnlab

__all__ = [
    "DistInfo",
    "RankFailure",
    "init_from_env",
    "wrap_ddp",
    "bn_layers",
    "sync_running_stats",
    "cleanup",
    "run_rank",
]

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class RankFailure(RuntimeError):
    """A collective failed or timed out: another rank crashed or stopped answering."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(backend: str | None = None, timeout_s: float = 60.0) -> DistInfo:
    """Initialise the default process group from torchrun's environment variables.

    ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` must be set
    (torchrun does). ``backend`` defaults to ``"nccl"`` when CUDA is available, else
    ``"gloo"``. Every collective is bounded by ``timeout_s`` seconds: a rank that crashes or
    hangs makes the others fail with an error instead of waiting forever.
    """
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"init_from_env: environment variables {missing} are not set; start the workers "
            "with torchrun (bnlab.lab.distributed.launch) or set them by hand"
        )
    if not (timeout_s > 0):
        raise ValueError(f"init_from_env: timeout_s must be > 0, got {timeout_s!r}")
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(
        backend,
        timeout=datetime.timedelta(seconds=timeout_s),
        **({"device_id": device} if backend == "nccl" else {}),
    )
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend, device)


def wrap_ddp(model: nn.Module, info: DistInfo, *, sync_bn: bool = False) -> nn.Module:
    """Move ``model`` to the worker's device and wrap it in ``DistributedDataParallel``.

    ``sync_bn=True`` first converts its BN layers with
    :meth:`bnlab.SyncBatchNorm.convert_sync_batchnorm` (CPU and GPU). Buffers are *not*
    broadcast from rank 0 at every forward (``broadcast_buffers=False``): each rank keeps its
    own running statistics (identical across ranks with SyncBN) and
    :func:`sync_running_stats` averages them before evaluation and checkpoints.
    """
    if sync_bn:
        model = SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(info.device)
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


@torch.no_grad()
def sync_running_stats(model: nn.Module, group=None) -> int:
    """Average every BN layer's floating-point running buffers over the ranks, in place.

    ``running_mean``, ``running_var`` (and bnlab's window buffers) become the mean of the
    ranks' values, ``num_batches_tracked`` the maximum. Without SyncBN each rank's statistics
    come from its own shard, so ranks disagree until this runs; with SyncBN they are already
    equal and this is a no-op up to rounding. Call it on every rank before evaluating or
    saving a checkpoint. Returns the number of layers synchronised; no-op (0) without an
    initialised process group.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    world = dist.get_world_size(group)
    layers = [m for _, m in bn_layers(model) if m.track_running_stats]
    for layer in layers:
        for name, buf in layer.named_buffers(recurse=False):
            if buf is None:
                continue
            if buf.is_floating_point():
                acc = buf.to(torch.float64)
                _collective(dist.all_reduce, acc, group=group)
                buf.copy_(acc / world)
            elif name == "num_batches_tracked":
                _collective(dist.all_reduce, buf, op=dist.ReduceOp.MAX, group=group)
    return len(layers)


def _collective(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistError) as e:  # DistBackendError etc.
        raise RankFailure(f"a collective failed, another rank probably crashed: {e}") from e


def cleanup() -> None:
    """Destroy the default process group if one is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_rank(label: str, work: Callable[[], object], hint: str = "") -> int:
    """Run this rank's ``work``; any failure ends the rank at once with status 1, never a hang.

    The message names ``label`` and the rank (``"{label}: rank R stopped: Error: ..."`` plus
    ``hint``). On failure the interpreter's teardown is skipped: destroying a process group
    whose peer died can block. On success the process group is destroyed and 0 is returned.
    """
    rank = os.environ.get("RANK", "?")
    try:
        work()
    except Exception as e:  # noqa: BLE001 - any failure must end this rank, never hang it
        print(f"{label}: rank {rank} stopped: {type(e).__name__}: {e}{hint}", file=sys.stderr,
              flush=True)
        os._exit(1)
    cleanup()
    return 0
