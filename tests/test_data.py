"""IDX reading, dataset discovery, verification, download and seeded batch order."""

from __future__ import annotations

import gzip
import hashlib

import numpy as np
import pytest
import torch

from bnlab.lab.data import (
    DataNotFoundError,
    DownloadError,
    IDXError,
    batch_order,
    download,
    find_files,
    load_dataset,
    read_idx,
    resolve_dataset,
    search_dirs,
    sources,
    verify,
    write_idx,
)
from bnlab.lab.data.idx import read_idx_bytes


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No $BNLAB_DATA, an empty cache and no Debian directories."""
    monkeypatch.delenv("BNLAB_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for name, spec in list(sources.SPECS.items()):
        fake = sources.DatasetSpec(spec.name, spec.files, spec.mirrors,
                                   (str(tmp_path / "debian" / name),), spec.debian_package)
        monkeypatch.setitem(sources.SPECS, name, fake)
    return tmp_path


def _tiny_spec(monkeypatch, name: str, n_train: int = 12, n_test: int = 6):
    """Swap in a spec of tiny shapes so tests write small synthetic IDX files."""
    spec = sources.SPECS[name]
    files = {
        k: sources.IdxFile(f.name, ((n_train if "train" in k else n_test),) + f.shape[1:], None)
        for k, f in spec.files.items()
    }
    monkeypatch.setitem(sources.SPECS, name, sources.DatasetSpec(
        name, files, spec.mirrors, spec.debian_dirs, spec.debian_package))
    return files


def _write_set(directory, files, seed=0, gz=True):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for f in files.values():
        if len(f.shape) == 1:
            a = rng.integers(0, 10, f.shape, dtype=np.uint8)
        else:
            a = rng.integers(0, 256, f.shape, dtype=np.uint8)
        write_idx(directory / (f.name + (".gz" if gz else "")), a)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, dtype, gz):
    a = (np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
    path = write_idx(tmp_path / ("a.idx" + (".gz" if gz else "")), a)
    b = read_idx(path, expect_shape=(None, 3, 5))
    assert b.dtype == np.dtype(dtype) and b.shape == (2, 3, 5)
    np.testing.assert_array_equal(a, b)


def test_idx_header_is_big_endian():
    raw = bytes([0, 0, 0x0C, 1]) + (2).to_bytes(4, "big") + (1).to_bytes(4, "big") + \
        (258).to_bytes(4, "big")
    np.testing.assert_array_equal(read_idx_bytes(raw), [1, 258])


def test_idx_errors(tmp_path):
    good = write_idx(tmp_path / "g.idx", np.zeros((4, 3), np.uint8)).read_bytes()
    with pytest.raises(IDXError, match="bad IDX magic number 0x504b0304"):
        read_idx_bytes(b"PK\x03\x04" + good[4:])
    with pytest.raises(IDXError, match="too short"):
        read_idx_bytes(b"\x00\x00")
    with pytest.raises(IDXError, match="truncated header"):
        read_idx_bytes(good[:9])
    with pytest.raises(IDXError, match=r"truncated: shape \(4, 3\) of uint8 needs 12 data bytes"):
        read_idx_bytes(good[:-1])
    with pytest.raises(IDXError, match="trailing bytes"):
        read_idx_bytes(good + b"\x00")
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gzip.compress(good)[:-10])
    with pytest.raises(IDXError, match="truncated or corrupt gzip"):
        read_idx(cut)
    with pytest.raises(IDXError, match=r"expected shape \(5, 3\), got \(4, 3\)"):
        read_idx(tmp_path / "g.idx", expect_shape=(5, 3))


def test_discovery_order(isolated, monkeypatch):
    files = _tiny_spec(monkeypatch, "mnist")
    explicit, env, cache = isolated / "explicit", isolated / "env", isolated / "cache" / "bnlab"
    explicit.mkdir()
    monkeypatch.setenv("BNLAB_DATA", str(env))
    dirs = search_dirs("mnist", explicit)
    assert dirs[:4] == [explicit / "mnist", explicit, env / "mnist", env]
    assert dirs[4:6] == [cache / "mnist", cache]
    assert dirs[-1] == isolated / "debian" / "mnist"
    _write_set(isolated / "debian" / "mnist", files)
    assert find_files("mnist")["train_images"].parent == isolated / "debian" / "mnist"
    _write_set(cache / "mnist", files, gz=False)
    found = find_files("mnist")["test_labels"]
    assert found == cache / "mnist" / "t10k-labels-idx1-ubyte"
    _write_set(env, files)
    assert find_files("mnist")["train_labels"].parent == env
    _write_set(explicit / "mnist", files)
    assert find_files("mnist", explicit)["train_labels"].parent == explicit / "mnist"


def test_an_empty_data_dir_is_an_error_not_a_fallback(isolated, monkeypatch):
    files = _tiny_spec(monkeypatch, "mnist")
    _write_set(isolated / "debian" / "mnist", files)  # a complete system copy exists
    empty = isolated / "empty"
    empty.mkdir()
    with pytest.raises(DataNotFoundError, match=r"--data-dir .*empty holds none of mnist's "
                       r"files \(looked in .*empty/mnist and .*empty for "):
        find_files("mnist", empty)


def test_missing_dataset_says_where_and_what_to_install(isolated):
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist") as e:
        find_files("fashion-mnist")
    assert str(isolated / "debian" / "fashion-mnist") in str(e.value)
    with pytest.raises(DataNotFoundError, match="neither MNIST nor Fashion-MNIST"):
        resolve_dataset("auto")


def test_auto_prefers_mnist(isolated, monkeypatch):
    files = _tiny_spec(monkeypatch, "mnist")
    ffiles = _tiny_spec(monkeypatch, "fashion-mnist")
    _write_set(isolated / "d" / "fashion-mnist", ffiles)
    assert resolve_dataset("auto", isolated / "d") == "fashion-mnist"
    _write_set(isolated / "d" / "mnist", files)
    assert resolve_dataset("auto", isolated / "d") == "mnist"


def test_load_and_verify_synthetic(isolated, monkeypatch):
    files = _tiny_spec(monkeypatch, "mnist")
    _write_set(isolated / "d", files, seed=3)
    ds = load_dataset("mnist", isolated / "d")
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_train.dtype == torch.float32
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert ds.y_test.dtype == torch.int64 and ds.y_test.shape == (6,)
    assert all(r["ok"] for r in verify("mnist", isolated / "d"))
    # A recorded checksum that does not match is reported, not ignored.
    bad = dict(files)
    bad["train_labels"] = sources.IdxFile(files["train_labels"].name, (12,), "0" * 64)
    spec = sources.SPECS["mnist"]
    monkeypatch.setitem(sources.SPECS, "mnist", sources.DatasetSpec(
        "mnist", bad, spec.mirrors, spec.debian_dirs, None))
    recs = {r["file"]: r for r in verify("mnist", isolated / "d")}
    assert not recs["train-labels-idx1-ubyte"]["ok"]
    assert "SHA-256 mismatch" in recs["train-labels-idx1-ubyte"]["message"]


def test_download_offline_fails_at_once_with_instructions(isolated):
    calls = []

    def offline(url, timeout):
        calls.append((url, timeout))
        raise OSError("Name or service not known")

    with pytest.raises(DownloadError, match="apt-get install dataset-fashion-mnist"):
        download("fashion-mnist", isolated / "dl", fetch=offline)
    assert len(calls) == len(sources.SPECS["fashion-mnist"].mirrors)  # first file only
    assert all(t <= 10 for _, t in calls)
    assert not any((isolated / "dl").iterdir())


def test_download_checks_content_and_writes_atomically(isolated, monkeypatch):
    rng = np.random.default_rng(1)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": np.array([1, 2, 3], np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (2, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": np.array([4, 5], np.uint8)}
    blobs = {}
    for name, a in arrays.items():
        write_idx(isolated / name, a, compress=False)
        blobs[name] = (isolated / name).read_bytes()
    files = {k: sources.IdxFile(f.name, arrays[f.name].shape,
                                hashlib.sha256(blobs[f.name]).hexdigest())
             for k, f in sources.SPECS["mnist"].files.items()}
    monkeypatch.setitem(sources.SPECS, "mnist", sources.DatasetSpec(
        "mnist", files, ("https://a/", "https://b/"), (), None))

    def fetch(url, timeout):
        name = url.rsplit("/", 1)[1].removesuffix(".gz")
        raw = blobs[name]
        if url.startswith("https://a/"):
            raw = raw[:-1] + b"\x07"  # a mirror serving corrupt content is skipped
        return gzip.compress(raw)

    target = download("mnist", isolated / "dl", fetch=fetch)
    assert sorted(p.name for p in target.iterdir()) == sorted(n + ".gz" for n in arrays)
    assert all(r["ok"] for r in verify("mnist", target))

    with pytest.raises(DownloadError, match="SHA-256 of the content"):
        download("mnist", isolated / "dl2", fetch=lambda url, t: gzip.compress(b"x"))
    assert not any((isolated / "dl2").iterdir())


def test_real_fashion_mnist_is_installed_and_verifies():
    # make demo / .ci/run install Debian's dataset-fashion-mnist; the checksums recorded in
    # bnlab must match its decompressed content.
    recs = verify("fashion-mnist")
    assert [r["ok"] for r in recs] == [True] * 4, recs


def test_mnist1d_generator_and_rng_untouched():
    # The global generators, which mnist1d reseeds, are handed back as they were.
    np.random.seed(123)  # noqa: NPY002
    before = np.random.random()  # noqa: NPY002
    np.random.seed(123)  # noqa: NPY002
    ds = load_dataset("mnist1d")
    assert np.random.random() == before  # noqa: NPY002
    assert ds.x_train.shape == (4000, 40) and ds.x_test.shape == (1000, 40)
    assert sorted(ds.y_train.unique().tolist()) == list(range(10))
    again = load_dataset("mnist1d")
    assert torch.equal(ds.x_train, again.x_train)


def test_batch_order_is_seeded_and_covers_every_example():
    a = torch.cat(list(batch_order(10, 4, seed=1, epoch=0)))
    assert sorted(a.tolist()) == list(range(10))
    assert torch.equal(a, torch.cat(list(batch_order(10, 4, seed=1, epoch=0))))
    assert not torch.equal(a, torch.cat(list(batch_order(10, 4, seed=1, epoch=1))))
    assert [len(b) for b in batch_order(10, 4, 0, 0)] == [4, 4, 2]
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        next(batch_order(10, 0, 0, 0))


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'; valid names: mnist"):
        load_dataset("cifar")


FASHION_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not __import__("os").path.isdir(FASHION_DIR),
                    reason="Debian's dataset-fashion-mnist is installed by make test")
def test_fashion_files_in_a_flat_directory_are_only_ever_fashion_mnist(isolated):
    import shutil

    flat = isolated / "flat"
    shutil.copytree(FASHION_DIR, flat)
    assert find_files("fashion-mnist", flat)["test_labels"].parent == flat
    with pytest.raises(DataNotFoundError, match="holds fashion-mnist's files, not mnist's"):
        find_files("mnist", flat)  # same file names, other content: never MNIST
    assert resolve_dataset("auto", flat) == "fashion-mnist"


def test_an_incomplete_data_dir_is_an_error_not_a_fallback(isolated, monkeypatch):
    files = _tiny_spec(monkeypatch, "mnist")
    _write_set(isolated / "debian" / "mnist", files)  # a complete system copy exists
    partial = isolated / "mine"
    _write_set(partial, files)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    (partial / "t10k-labels-idx1-ubyte.gz").mkdir()  # a directory in its place
    with pytest.raises(DataNotFoundError, match=r"--data-dir .*mine lacks t10k-labels"):
        find_files("mnist", partial)


def test_idx_files_of_another_element_type_are_refused(isolated, monkeypatch):
    from bnlab.lab.data import load_dataset

    files = _tiny_spec(monkeypatch, "mnist")
    d = isolated / "floats"
    _write_set(d, files)
    f = files["train_images"]
    write_idx(d / (f.name + ".gz"), np.full(f.shape, 0.5, dtype=np.float32))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz: IDX elements of type "
                                         r"float32; mnist's files hold unsigned bytes"):
        load_dataset("mnist", d)


def test_an_unpacked_copy_is_cached_and_follows_its_source(tmp_path):
    import gzip as _gzip

    from bnlab.lab.data.idx import decompressed_bytes

    src = tmp_path / "a-idx1-ubyte.gz"
    src.write_bytes(_gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x03abc"))
    cache = tmp_path / "cache"
    first = decompressed_bytes(src, cache)
    (copy,) = cache.iterdir()
    assert copy.read_bytes() == first and copy.name.startswith("a-idx1-ubyte-")
    copy.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x03xyz")  # read from the cache now
    assert decompressed_bytes(src, cache).endswith(b"xyz")
    src.write_bytes(_gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x04abcd"))  # a new source
    assert decompressed_bytes(src, cache).endswith(b"abcd") and len(list(cache.iterdir())) == 2
    ro = tmp_path / "ro"
    ro.write_text("a file where the cache directory would be")
    assert decompressed_bytes(src, ro / "sub").endswith(b"abcd")  # unwritable: still reads
