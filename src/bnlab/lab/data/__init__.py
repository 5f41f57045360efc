"""Datasets for bnlab's experiments: MNIST, Fashion-MNIST (IDX files), MNIST-1D, and the
variable-length sequences of Japanese Vowels (``.ts`` files) and cropped MNIST-1D."""

from . import vowels
from .datasets import DATASETS, Dataset, batch_order, load_dataset, resolve_dataset
from .idx import IDXError, read_idx, write_idx
from .sequences import SEQUENCE_DATASETS, SequenceDataset, Sequences, load_sequences
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
from .ts import TSError, read_ts

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
    "SEQUENCE_DATASETS",
    "SequenceDataset",
    "Sequences",
    "load_sequences",
    "TSError",
    "read_ts",
    "vowels",
]
