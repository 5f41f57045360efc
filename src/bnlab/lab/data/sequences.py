"""Variable-length sequence datasets, held as zero-padded tensors with their lengths.

Two datasets: Japanese Vowels (:mod:`.vowels`, real utterances of 7 to 29 frames) and
MNIST-1D cropped to variable lengths (:func:`cropped_mnist1d`). Each split is a
:class:`Sequences`: ``x`` float32 ``(N, C, L)`` with sequence ``n`` in ``x[n, :, :lengths[n]]``
and zeros after it, ``lengths`` int64 ``(N,)``, labels int64 ``(N,)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["Sequences", "SequenceDataset", "pad", "cropped_mnist1d", "load_sequences",
           "SEQUENCE_DATASETS"]

SEQUENCE_DATASETS = ("japanese-vowels", "mnist1d-crop")


@dataclass(frozen=True)
class Sequences:
    """One split: padded sequences ``x (N, C, L)``, their ``lengths (N,)`` and labels ``y``."""

    x: Tensor
    lengths: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)

    def mask(self) -> Tensor:
        """Boolean ``(N, L)``, true at each sequence's own (valid) positions."""
        return torch.arange(self.x.shape[2])[None, :] < self.lengths[:, None]

    def take(self, index: Tensor) -> Sequences:
        return Sequences(self.x[index], self.lengths[index], self.y[index])


@dataclass(frozen=True)
class SequenceDataset:
    name: str
    train: Sequences
    test: Sequences
    source: str
    num_classes: int


def pad(series: Sequence[np.ndarray | Tensor], length: int | None = None) -> tuple[Tensor, Tensor]:
    """Stack ``(C, L_i)`` series into zeros ``(N, C, L)`` (``L``: the longest, or ``length``)
    and return it with the lengths."""
    if not series:
        raise ValueError("pad: series must hold at least one sequence, got none")
    lengths = torch.tensor([s.shape[1] for s in series], dtype=torch.int64)
    longest = int(lengths.max())
    if length is None:
        length = longest
    elif length < longest:
        raise ValueError(f"pad: length must be >= the longest sequence ({longest}), got {length}")
    x = torch.zeros(len(series), series[0].shape[0], length, dtype=torch.float32)
    for n, s in enumerate(series):
        x[n, :, : s.shape[1]] = torch.as_tensor(s, dtype=torch.float32)
    return x, lengths


def crop(x: Tensor, min_length: int, seed: int) -> Sequences:
    """Random crops of the ``(N, L)`` signals ``x``, left-aligned and zero-padded to ``L``.

    Sequence ``n`` gets a length ``l_n`` uniform in ``[min_length, L]`` and a start ``s_n``
    uniform in ``[0, L - l_n]``, both drawn once from ``torch.Generator`` seeded ``seed``; it
    becomes ``x[n, s_n : s_n + l_n]`` followed by ``L - l_n`` zeros. Returns ``x`` as
    ``(N, 1, L)`` with the lengths and no labels (``y`` empty).
    """
    n, length = x.shape
    if not 1 <= min_length <= length:
        raise ValueError(f"crop: min_length must be in [1, {length}], got {min_length}")
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_length, length + 1, (n,), generator=g)
    starts = (torch.rand(n, generator=g) * (length - lengths + 1)).long()
    pos = torch.arange(length)[None, :]
    src = (starts[:, None] + pos).clamp(max=length - 1)
    out = torch.where(pos < lengths[:, None], x.gather(1, src), torch.zeros(()))
    return Sequences(out.unsqueeze(1), lengths, torch.empty(0, dtype=torch.int64))


def cropped_mnist1d(min_length: int = 20, seed: int = 0) -> SequenceDataset:
    """MNIST-1D (the ``mnist1d`` package's generator, 4000/1000 signals of 40 points) with
    every signal randomly cropped to a length in ``[min_length, 40]`` and zero-padded to 40
    (:func:`crop`; train crops drawn with ``seed``, test crops with ``seed + 1``)."""
    from .datasets import load_dataset

    d = load_dataset("mnist1d")
    tr, te = crop(d.x_train, min_length, seed), crop(d.x_test, min_length, seed + 1)
    return SequenceDataset(
        "mnist1d-crop", Sequences(tr.x, tr.lengths, d.y_train),
        Sequences(te.x, te.lengths, d.y_test),
        source=f"{d.source}, cropped to [{min_length}, 40] (crop seeds {seed}, {seed + 1})",
        num_classes=10)


def load_sequences(name: str, data_dir: str | None = None, **kwargs) -> SequenceDataset:
    """``japanese-vowels`` (:func:`.vowels.load_japanese_vowels`) or ``mnist1d-crop``
    (:func:`cropped_mnist1d`, keywords ``min_length`` and ``seed``)."""
    if name == "japanese-vowels":
        from .vowels import load_japanese_vowels

        return load_japanese_vowels(data_dir)
    if name == "mnist1d-crop":
        return cropped_mnist1d(**kwargs)
    raise ValueError(f"unknown sequence dataset {name!r}; valid names: "
                     f"{', '.join(SEQUENCE_DATASETS)}")
