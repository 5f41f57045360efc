"""Datasets for bnlab's experiments: MNIST, Fashion-MNIST (IDX files) and MNIST-1D."""

from .datasets import DATASETS, Dataset, batch_order, load_dataset, resolve_dataset
from .idx import IDXError, read_idx, write_idx
from .sources import (
    SPECS,
    DataNotFoundError,
    DownloadError,
    cache_dir,
    check_data_dir,
    download,
    find_files,
    search_dirs,
    verify,
)

__all__ = [
    "DATASETS",
    "Dataset",
    "batch_order",
    "load_dataset",
    "resolve_dataset",
    "IDXError",
    "read_idx",
    "write_idx",
    "SPECS",
    "DataNotFoundError",
    "DownloadError",
    "cache_dir",
    "check_data_dir",
    "download",
    "find_files",
    "search_dirs",
    "verify",
]
