"""BN statistics recorded during training: :class:`bnlab.tools.Monitor` inside the trainer.

With ``TrainConfig(monitor=True)`` every ``monitor_every``-th optimisation step (global step 0
included) runs under a :class:`~bnlab.tools.Monitor`; its flat rows, tagged with the global
``step`` and ``epoch``, go to ``monitor.jsonl`` in the run directory, one row per BN layer and
recorded step. The hooks exist only during the recorded steps, so other steps run untouched;
a recorded step's ``time`` includes the monitoring work. Nothing here draws from a random
generator, so monitored runs produce the same weights as unmonitored ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["MONITOR_FILE", "should_record", "monitored"]

MONITOR_FILE = "monitor.jsonl"


def should_record(every: int, step: int) -> bool:
    return step % every == 0


def monitored(model: nn.Module, step: int, epoch: int, fn: Callable[..., Any], *args: Any
              ) -> tuple[Any, list[dict]]:
    """Run ``fn(*args)`` (one optimisation step of ``model``) under a Monitor; return its
    result and the rows, one per BN layer, with ``step``/``epoch`` set to the trainer's."""
    from bnlab.tools.monitor import Monitor

    with Monitor(model) as mon:
        result = fn(*args)
    rows = []
    for r in mon.to_rows():
        if r.pop("step") != 0:  # a second forward inside one step (none in this trainer)
            continue
        rows.append({"step": step, "epoch": epoch, **r})
    return result, rows
