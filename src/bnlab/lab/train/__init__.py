"""Training runs: a frozen config, a deterministic resumable trainer, run directories, and
:func:`train_step`, the one optimisation step every loop of the lab takes."""

from .commit import load_checkpoint
from .config import TrainConfig, lr_at, parse_overrides
from .loop import EvalResult, build, evaluate, train
from .progress import PlainProgress, Progress, make_progress
from .resume import ResumeError, RunExistsError
from .rundir import is_run_dir, read_json, read_jsonl, run_environment
from .step import StepResult, train_step

__all__ = [
    "TrainConfig",
    "lr_at",
    "parse_overrides",
    "RunExistsError",
    "ResumeError",
    "build",
    "evaluate",
    "EvalResult",
    "train",
    "train_step",
    "StepResult",
    "PlainProgress",
    "Progress",
    "make_progress",
    "is_run_dir",
    "load_checkpoint",
    "read_json",
    "read_jsonl",
    "run_environment",
]
