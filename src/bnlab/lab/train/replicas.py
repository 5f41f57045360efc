"""Where the trainer runs: one process (:class:`Local`) or one rank of a data-parallel job
(:class:`Replicas`). The trainer calls the same hooks either way; see :mod:`bnlab.lab.train.ddp`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Local", "Replicas"]


class Local:
    """The single-process context: every hook is the identity."""

    rank, world_size, is_main = 0, 1, True
    device = torch.device("cpu")

    def wrap(self, model: nn.Module, sync_bn: bool) -> tuple[nn.Module, nn.Module]:
        return model, model

    def shard(self, idx: Tensor) -> Tensor:
        return idx

    def reduce(self, values: list[float]) -> list[float]:
        return values

    def sync_stats(self, model: nn.Module) -> None:
        pass

    def barrier(self) -> None:
        pass


class Replicas(Local):
    """One rank of a torch.distributed job (see the module doc)."""

    def __init__(self, info: Any) -> None:
        self.info = info
        self.rank, self.world_size = info.rank, info.world_size
        self.is_main = info.is_main
        self.device = info.device

    def wrap(self, model: nn.Module, sync_bn: bool) -> tuple[nn.Module, nn.Module]:
        from ..distributed import wrap_ddp

        ddp = wrap_ddp(model, self.info, sync_bn=sync_bn)
        return ddp, ddp.module

    def shard(self, idx: Tensor) -> Tensor:
        # A final batch smaller than the world is used whole by every rank: all ranks must
        # take the same number of steps, and no rank may see an empty batch.
        return idx[self.rank :: self.world_size] if len(idx) >= self.world_size else idx

    def reduce(self, values: list[float]) -> list[float]:
        from ..distributed.runtime import _collective

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        _collective(torch.distributed.all_reduce, t)
        return t.tolist()

    def sync_stats(self, model: nn.Module) -> None:
        from ..distributed import sync_running_stats

        sync_running_stats(model)

    def barrier(self) -> None:
        from ..distributed.runtime import _collective

        _collective(torch.distributed.barrier)
