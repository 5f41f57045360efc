"""Studies that measure each claim the seed makes about BN, with several seeds.

``bnlab study list`` names them; ``bnlab study run NAME --preset quick`` runs one and writes a
run directory with ``results.json`` and a report; ``bnlab study table`` builds the README's
results table from run directories.
"""

from __future__ import annotations

import importlib

from ._base import Comparison, Study, StudyContext, StudyResult, compare, judge, run_study

__all__ = ["STUDY_MODULES", "get_study", "study_names", "run_study", "Study", "StudyContext",
           "StudyResult", "Comparison", "compare", "judge"]

# name -> module defining STUDY; imported lazily so `bnlab study list` stays fast
STUDY_MODULES = {
    "ioffe-mnist": "ioffe",
    "learning-rate": "learning_rate",
    "batch-size": "batch_size",
    "regularization": "regularization",
    "running-stats": "running_stats",
    "depth": "depth",
    "shift": "shift",
    "beyond-images": "beyond_images",
    "sequences": "sequences",
    "cost": "cost",
}


def study_names() -> list[str]:
    return list(STUDY_MODULES)


def get_study(name: str) -> Study:
    if name not in STUDY_MODULES:
        raise ValueError(f"unknown study {name!r}; valid names: {', '.join(sorted(STUDY_MODULES))}")
    return importlib.import_module(f"{__name__}.{STUDY_MODULES[name]}").STUDY
