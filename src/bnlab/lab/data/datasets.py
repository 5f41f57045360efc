"""Datasets held in memory as tensors, and seeded mini-batch order.

``load_dataset("fashion-mnist")`` reads the four IDX files found by
:func:`bnlab.lab.data.find_files` and returns images as float32 ``(N, 1, 28, 28)`` in ``[0, 1]``
(the tutorial divides by 255 too) and labels as int64 ``(N,)``. ``load_dataset("mnist1d")``
generates MNIST-1D with the ``mnist1d`` package's own generator (no pickle cache, no network):
float32 ``(N, 40)`` sequences, 4000 train / 1000 test.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .idx import read_idx
from .sources import SPECS, DataNotFoundError, cache_dir, find_files

__all__ = ["Dataset", "load_dataset", "resolve_dataset", "batch_order", "DATASETS"]

DATASETS = ("mnist", "fashion-mnist", "mnist1d")


@dataclass(frozen=True)
class Dataset:
    """A train and a test split as tensors, with where they came from."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    source: str
    num_classes: int = 10

    def subset(self, train: int | None = None, test: int | None = None) -> Dataset:
        """The first ``train``/``test`` examples (``None`` or 0 keeps a split whole)."""
        tr = slice(None) if not train else slice(0, train)
        te = slice(None) if not test else slice(0, test)
        return Dataset(
            self.name, self.x_train[tr], self.y_train[tr], self.x_test[te], self.y_test[te],
            self.source, self.num_classes,
        )


def _load_idx(name: str, data_dir: str | os.PathLike | None) -> Dataset:
    spec = SPECS[name]
    paths = find_files(name, data_dir)
    unpacked = cache_dir() / "unpacked"
    arrays = {k: read_idx(p, spec.files[k].shape, unpacked) for k, p in paths.items()}
    for k, a in arrays.items():
        if a.dtype != np.uint8:  # a float file would train to NaN without a word
            raise ValueError(f"{paths[k]}: IDX elements of type {a.dtype}; {name}'s files hold "
                             "unsigned bytes (IDX type 0x08)")
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise ValueError(f"{name}: {n_img} {split} images but {n_lab} labels")
        if arrays[f"{split}_labels"].max() >= 10:
            raise ValueError(f"{name}: {split} labels outside 0..9 in {paths[f'{split}_labels']}")

    def images(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a).to(torch.float32).div_(255.0).unsqueeze(1)

    def labels(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return Dataset(
        name,
        images(arrays["train_images"]), labels(arrays["train_labels"]),
        images(arrays["test_images"]), labels(arrays["test_labels"]),
        source=str(paths["train_images"].parent),
    )


def _load_mnist1d(seed: int | None = None) -> Dataset:
    os.environ.setdefault("MPLBACKEND", "Agg")  # mnist1d imports pyplot
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    if seed is not None:
        args.seed = seed
    # make_dataset seeds numpy's and Python's global generators; give the caller theirs back.
    np_state, py_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)  # noqa: NPY002
        random.setstate(py_state)
    return Dataset(
        "mnist1d",
        torch.as_tensor(d["x"], dtype=torch.float32), torch.as_tensor(d["y"], dtype=torch.int64),
        torch.as_tensor(d["x_test"], dtype=torch.float32),
        torch.as_tensor(d["y_test"], dtype=torch.int64),
        source=f"mnist1d.data.make_dataset (seed {args.seed})",
    )


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load ``name`` (``mnist``, ``fashion-mnist`` or ``mnist1d``) into memory."""
    if name == "mnist1d":
        return _load_mnist1d()
    if name not in SPECS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return _load_idx(name, data_dir)


def resolve_dataset(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """Resolve ``auto`` to MNIST when present, else Fashion-MNIST; other names pass through.

    Raises :class:`DataNotFoundError` with instructions when neither is present.
    """
    if name != "auto":
        return name
    errors = []
    for candidate in ("mnist", "fashion-mnist"):
        try:
            find_files(candidate, data_dir)
            return candidate
        except DataNotFoundError as e:
            errors.append(str(e))
    raise DataNotFoundError(
        "--dataset auto found neither MNIST nor Fashion-MNIST.\n" + "\n\n".join(errors)
    )


def batch_order(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True
                ) -> Iterator[Tensor]:
    """Index tensors of the mini-batches of one epoch.

    The order depends only on ``(seed, epoch)``, so a run resumed at any step of any epoch
    sees exactly the batches an uninterrupted run sees.
    """
    if batch_size < 1:
        raise ValueError(f"batch_order: batch_size must be >= 1, got {batch_size}")
    if shuffle:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g)
    else:
        perm = torch.arange(n)
    for start in range(0, n, batch_size):
        yield perm[start : start + batch_size]
