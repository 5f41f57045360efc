"""One frozen dataclass describes a training run; it loads from TOML and takes overrides.

``TrainConfig.from_toml("run.toml").replace(epochs=2)`` or, from the command line,
``--set epochs=2``. Unknown keys and ill-typed values are errors naming the key. The resolved
config is written into the run directory as ``config.toml`` (by tomli-w, a TOML writer) and
loads back unchanged; NaN and infinities are refused when a config is made, so they never reach
a file.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib

__all__ = ["TrainConfig", "parse_overrides", "lr_at"]

Optimizer = Literal["adam", "sgd"]
#: more threads than this is a typo, not a machine (torch crashes on huge counts)
_MAX_THREADS = 1024
Schedule = Literal["constant", "cosine", "step"]
Dataset = Literal["mnist", "fashion-mnist", "mnist1d"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what a training run computes.

    Attributes:
        model: a name from :func:`bnlab.lab.models.model_names` (an old name, e.g. ``seed_cnn``,
            becomes the name now, with a note).
        norm: a normaliser name from :func:`bnlab.norms.norm_names`.
        placement: ``"after"`` or ``"before"`` the activation (``small_cnn`` only).
        dataset: ``mnist``, ``fashion-mnist`` or ``mnist1d``.
        data_dir: searched first for the dataset files (empty: discovery only).
        train_subset, test_subset: use the first N examples (0: all).
        epochs, batch_size: the tutorial's are 10 and 128.
        optimizer: ``adam`` or ``sgd``; ``lr``, ``momentum`` (SGD), ``weight_decay``.
        schedule: ``constant``, ``cosine`` (per step, to 0 at the end) or ``step``
            (multiply by ``gamma`` every ``step_epochs`` epochs).
        seed: initialisation and shuffling; threads: torch threads (0: leave as is).
        eval_batch_size: batch size for evaluation.
        label: the name reports use for this run (empty: the norm name).
        monitor: record :class:`bnlab.tools.Monitor` statistics of every BN layer into
            ``monitor.jsonl`` (input/output percentiles, running-vs-batch drift, gradient
            norms, gamma/beta) every ``monitor_every`` optimisation steps (step 0 included).
        nproc_per_node: data-parallel processes (>1: ``bnlab train`` launches them with
            torchrun; ``batch_size`` stays the global batch, split over the ranks).
        sync_bn: convert BN layers to :class:`bnlab.SyncBatchNorm` (needs nproc_per_node > 1).
    """

    model: str = "small_cnn"
    norm: str = "bn"
    placement: str = "after"
    dataset: str = "fashion-mnist"
    data_dir: str = ""
    train_subset: int = 0
    test_subset: int = 0
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    step_epochs: int = 1
    gamma: float = 0.1
    seed: int = 0
    threads: int = 0
    eval_batch_size: int = 1000
    label: str = ""
    monitor: bool = False
    monitor_every: int = 50
    nproc_per_node: int = 1
    sync_bn: bool = False

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), hints[f.name]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
            elif not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                raise TypeError(
                    f"TrainConfig: {f.name} must be {kind.__name__}, got {value!r} "
                    f"({type(value).__name__})"
                )
        _choice("optimizer", self.optimizer, Optimizer)
        _choice("schedule", self.schedule, Schedule)
        _choice("placement", self.placement, Literal["after", "before"])
        _choice("dataset", self.dataset, Dataset)
        for name in ("epochs", "batch_size", "eval_batch_size", "step_epochs", "monitor_every",
                     "nproc_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("train_subset", "test_subset", "threads", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig: {name} must be >= 0, got {getattr(self, name)}")
        if self.sync_bn and self.nproc_per_node < 2:
            raise ValueError("TrainConfig: sync_bn needs nproc_per_node > 1, got "
                             f"nproc_per_node={self.nproc_per_node}; drop --sync-bn or add "
                             "--nproc-per-node 2")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig: lr must be a positive finite float, got {self.lr}")
        # NaN passes every `<` check and trains to NaN: each float is checked to be finite
        if not (0.0 <= self.momentum < 1.0):
            raise ValueError(f"TrainConfig: momentum must be a float in [0, 1), got "
                             f"{self.momentum}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"TrainConfig: weight_decay must be a finite float >= 0, got "
                             f"{self.weight_decay}")
        if not (0.0 < self.gamma <= 1.0):
            raise ValueError(f"TrainConfig: gamma (the step schedule's factor) must be in "
                             f"(0, 1], got {self.gamma}")
        if self.threads > _MAX_THREADS:
            raise ValueError(f"TrainConfig: threads must be at most {_MAX_THREADS} (0: torch's "
                             f"default), got {self.threads}")
        # Fail on a typo now, not after the data has loaded.
        from bnlab.norms import norm_names

        from ..models import canonical_model, model_names

        object.__setattr__(self, "model", canonical_model(self.model))
        if self.model not in model_names():
            raise ValueError(
                f"TrainConfig: unknown model {self.model!r}; valid names: "
                f"{', '.join(model_names())}"
            )
        sequence_models = {"mnist1d_mlp", "mnist1d_cnn"}
        if (self.dataset == "mnist1d") != (self.model in sequence_models) and \
                self.dataset in ("mnist", "fashion-mnist", "mnist1d"):
            fits = sorted(sequence_models) if self.dataset == "mnist1d" else sorted(
                set(model_names()) - sequence_models)
            raise ValueError(
                f"TrainConfig: model {self.model!r} does not take {self.dataset!r} inputs; "
                f"models for {self.dataset}: {', '.join(fits)}"
            )
        if self.norm not in norm_names():
            raise ValueError(
                f"TrainConfig: unknown normaliser {self.norm!r}; valid names: "
                f"{', '.join(norm_names())}"
            )

    @property
    def name(self) -> str:
        return self.label or self.norm

    # ---------------------------------------------------------------- conversions
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"TrainConfig: unknown key(s) {', '.join(unknown)}; valid keys: "
                f"{', '.join(sorted(known))}"
            )
        return cls(**d)

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainConfig:
        with open(path, "rb") as fh:
            try:
                data = tomllib.load(fh)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path}: not a TOML file ({e})") from e
        nested = sorted(k for k, v in data.items() if isinstance(v, dict))
        if nested:
            raise ValueError(f"{path}: tables are not config keys: {', '.join(nested)}")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def to_toml(self) -> str:
        """The config as TOML text, written by tomli-w. Every float is finite (checked when
        the config was made, and again here: TOML's ``nan`` must never reach a file)."""
        d = self.to_dict()
        bad = [k for k, v in d.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise ValueError(f"TrainConfig: {', '.join(bad)} must be finite, got "
                             f"{', '.join(repr(d[k]) for k in bad)}")
        return tomli_w.dumps(d)


def _choice(name: str, value: str, literal: Any) -> None:
    if value not in get_args(literal):
        raise ValueError(
            f"TrainConfig: {name} must be one of {sorted(get_args(literal))}, got {value!r}"
        )


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["epochs=2", "lr=0.01"]`` -> ``{"epochs": 2, "lr": 0.01}``, typed by the field."""
    hints = typing.get_type_hints(TrainConfig)
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        if key not in hints:
            raise ValueError(
                f"--set: unknown key {key!r}; valid keys: {', '.join(sorted(hints))}"
            )
        kind = hints[key]
        if kind is bool:
            if raw.strip().lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--set {key}: expected true or false, got {raw!r}")
            out[key] = raw.strip().lower() in ("true", "1")
            continue
        try:
            out[key] = kind(raw) if kind is not str else raw
        except ValueError as e:
            raise ValueError(f"--set {key}: expected {kind.__name__}, got {raw!r}") from e
    return out


def lr_at(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The learning rate of optimisation step ``step`` (0-based): a pure function, so resuming
    needs no scheduler state."""
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "step":
        return config.lr * config.gamma ** ((step // steps_per_epoch) // config.step_epochs)
    total = config.epochs * steps_per_epoch
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
