"""Data for the studies: real datasets, loaded once per process, subset per preset."""

from __future__ import annotations

from functools import lru_cache

from ..data import Dataset, load_dataset, resolve_dataset


@lru_cache(maxsize=4)
def _load(name: str, data_dir: str | None) -> Dataset:
    return load_dataset(name, data_dir)


def images(ctx, *, prefer_mnist: bool = False) -> Dataset:
    """Fashion-MNIST (or MNIST first when ``prefer_mnist`` and present), cut to the preset's
    ``train``/``test`` sizes."""
    name = resolve_dataset("auto", ctx.data_dir) if prefer_mnist else "fashion-mnist"
    d = _load(name, ctx.data_dir)
    return d.subset(ctx.settings.get("train"), ctx.settings.get("test"))


def mnist1d(ctx) -> Dataset:
    return _load("mnist1d", None)
