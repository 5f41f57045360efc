"""``bnlab run small-cnn``: a small CNN once per normaliser and seed, then a report.

::

    OUT/
      study.json              what was asked: dataset, epochs, normalisers, seeds
      runs/<norm>-s<seed>/    one run directory each (see bnlab.lab.train.rundir)
      report.md, report.html, report-files/
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import load_dataset, resolve_dataset
from .config import TrainConfig
from .loop import train
from .progress import Progress
from .rundir import is_run_dir, make_out_dir, read_json, write_json

__all__ = ["SmallCNNStudy", "run_small_cnn_study", "default_out"]


@dataclass(frozen=True)
class SmallCNNStudy:
    dataset: str = "auto"
    epochs: int = 10
    norms: tuple[str, ...] = ("none", "bn", "bn-window", "bn-running")
    seeds: int = 1
    placement: str = "after"
    batch_size: int = 128
    lr: float = 1e-3
    train_subset: int = 0
    test_subset: int = 0
    threads: int = 0
    data_dir: str = ""
    monitor: bool = False
    monitor_every: int = 50

    def configs(self, dataset: str) -> list[TrainConfig]:
        if self.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {self.seeds}")
        if not self.norms:
            raise ValueError("--norms must name at least one normaliser, e.g. none,bn")
        return [
            TrainConfig(model="small_cnn", norm=n, placement=self.placement, dataset=dataset,
                        data_dir=self.data_dir, train_subset=self.train_subset,
                        test_subset=self.test_subset, epochs=self.epochs,
                        batch_size=self.batch_size, lr=self.lr, seed=s, threads=self.threads,
                        monitor=self.monitor, monitor_every=self.monitor_every)
            for s in range(self.seeds) for n in self.norms
        ]


def default_out(dataset: str) -> Path:
    return Path("runs") / f"small-cnn-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_small_cnn_study(study: SmallCNNStudy, out: str | Path | None = None, *,
                        resume: bool = False, progress: Progress | None = None
                        ) -> dict[str, Any]:
    """Train every (normaliser, seed) of ``study`` and write the report. Returns ``out``,
    ``report`` (:class:`bnlab.lab.report.ReportPaths`), ``table`` and ``answer`` (the report's
    table and sentences, as data) and ``summaries``. Runs already complete are skipped with
    ``resume``; an interrupted one continues.
    """
    from ..report import run_report

    progress = progress or Progress()
    dataset = resolve_dataset(study.dataset, study.data_dir or None)
    configs = study.configs(dataset)  # validates every normaliser before loading anything
    out = Path(out) if out else default_out(dataset)
    asked = {k: (list(v) if isinstance(v, tuple) else v) for k, v in study.__dict__.items()}
    if (out / "study.json").exists():
        if not resume:
            raise FileExistsError(f"{out} already holds a study; pass --resume or another --out")
        # A resumed study must be the study that was started: one report never compares runs
        # trained under different settings.
        saved = read_json(out / "study.json")
        before = dict(saved.get("study", {}), dataset=saved.get("dataset"))
        now = dict(asked, dataset=dataset)
        changed = [f"{k} (was {before.get(k)!r}, now {v!r})" for k, v in now.items()
                   if before.get(k) != v]
        if changed:
            raise ValueError(
                f"{out}: --resume with other settings than the study was started with: "
                f"{'; '.join(changed)}; resume with the same flags or choose another --out"
            )
    make_out_dir(out)
    data = load_dataset(dataset, study.data_dir or None)
    n_train = study.train_subset or len(data.x_train)
    info = {"title": f"A small CNN on {dataset}: with and without normalisation",
            "kind": "small-cnn", "dataset": dataset, "epochs": study.epochs,
            "norms": list(study.norms), "seeds": study.seeds, "train_examples": n_train,
            "study": asked}
    write_json(out / "study.json", info)
    progress.message(f"bnlab run small-cnn: {dataset} ({n_train} training examples), "
                     f"{study.epochs} epochs, normalisers {', '.join(study.norms)}, "
                     f"{study.seeds} seed(s) -> {out}")
    summaries = []
    try:
        for c in configs:
            run_dir = out / "runs" / f"{c.norm}-s{c.seed}"
            if resume and (run_dir / "summary.json").exists() and \
                    read_json(run_dir / "summary.json").get("status") == "complete":
                summaries.append(read_json(run_dir / "summary.json"))
                continue
            # --resume continues the runs begun; those not begun yet start
            summaries.append(train(c, run_dir, dataset=data, progress=progress,
                                   resume=resume and is_run_dir(run_dir)))
    finally:
        progress.close()
    report = run_report([out])
    return {"out": out, "report": report.write(out), "table": report.table,
            "answer": report.answer, "summaries": summaries}
