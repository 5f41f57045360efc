"""Progress output: a rich progress bar on a terminal, one plain line per epoch otherwise."""

from __future__ import annotations

import sys
from typing import Any, TextIO

__all__ = ["Progress", "PlainProgress", "RichProgress", "make_progress"]


def _epoch_line(label: str, rec: dict[str, Any], epochs: int) -> str:
    return (
        f"[{label}] epoch {rec['epoch'] + 1}/{epochs}  train loss {rec['train_loss']:.4f} "
        f"acc {rec['train_acc']:.4f}  val loss {rec['val_loss']:.4f} acc {rec['val_acc']:.4f}  "
        f"{rec['epoch_time']:.1f} s"
    )


class Progress:
    """What the trainer calls. The base class prints nothing but notices."""

    def start_epoch(self, label: str, epoch: int, epochs: int, steps: int, done: int) -> None:
        pass

    def step(self, loss: float) -> None:
        pass

    def end_epoch(self, label: str, record: dict[str, Any], epochs: int) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def notice(self, text: str) -> None:
        """What ``--resume`` changed or skipped (rows dropped, an unfinished write removed, a
        run already complete): on stderr even when quiet. Subclasses show it as a message."""
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class PlainProgress(Progress):
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout

    def end_epoch(self, label: str, record: dict[str, Any], epochs: int) -> None:
        print(_epoch_line(label, record, epochs), file=self.stream, flush=True)

    def message(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    notice = message


class RichProgress(Progress):
    def __init__(self) -> None:
        from rich.console import Console
        from rich.markup import escape
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as Bar

        self._escape = escape  # "[bn] epoch 1" is text, not a rich markup tag
        self.console = Console()
        self.bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
                       console=self.console, transient=True)
        self.bar.start()
        self.task = None

    def start_epoch(self, label: str, epoch: int, epochs: int, steps: int, done: int) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.task = self.bar.add_task(self._escape(f"[{label}] epoch {epoch + 1}/{epochs}"),
                                      total=steps,
                                      completed=done, loss="-")

    def step(self, loss: float) -> None:
        self.bar.update(self.task, advance=1, loss=f"{loss:.4f}")

    def end_epoch(self, label: str, record: dict[str, Any], epochs: int) -> None:
        self.console.print(self._escape(_epoch_line(label, record, epochs)))

    def message(self, text: str) -> None:
        self.console.print(self._escape(text))

    notice = message

    def close(self) -> None:
        self.bar.stop()


def make_progress(quiet: bool = False) -> Progress:
    """Rich on a terminal, plain lines when output is piped or logged, nothing when quiet."""
    if quiet:
        return Progress()
    if sys.stdout.isatty():
        try:
            return RichProgress()
        except ImportError:
            pass
    return PlainProgress()
