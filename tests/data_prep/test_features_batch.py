"""Batched feature extraction: padded, length-sorted batches give what one-at-a-time reading gives (1e-5), for
every frame-level encoder; ``prepare`` and ``kmeans`` batch with ``--batch-seconds`` and keep row order and the
handling of unreadable files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from tiny_encoders import our_tiny, write_hf_directory

from speechprompt.cli import main
from speechprompt.data_prep.features import (
    FeatureError,
    FeatureReader,
    HubertFeatureReader,
    build_feature_reader,
    length_batches,
    read_files,
    read_waveforms,
)
from speechprompt.data_prep.kmeans import collect_features

pytestmark = pytest.mark.usefixtures("one_thread")

SR = 16000
# Tiny encoders: stride 80, receptive field 100 samples. 60 samples give no frame; 3001 is cut in chunks below.
LENGTHS = [2000, 1733, 60, 1290, 999, 480, 3001, 1733]


def _waveforms(lengths: list[int] = LENGTHS, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [0.3 * torch.randn(n, generator=g) for n in lengths]


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("name", ["wav2vec2", "hubert", "wavlm", "data2vec", "wav2vec2_large"])
def test_batch_equals_one_at_a_time(name: str, normalize: bool) -> None:
    reader = HubertFeatureReader(our_tiny(name), {"normalize": normalize}, layer=2)
    reader.max_chunk = 2500  # the 3001-sample utterance is read in chunks, outside the batch, as read() does
    wavs = _waveforms()
    alone = [reader.read(w) for w in wavs]
    batched = reader.read_batch(wavs)
    assert [f.shape for f in batched] == [f.shape for f in alone]
    assert alone[2].shape[0] == 0 and alone[0].shape == (reader.model.num_frames(2000), 32)
    for a, b in zip(alone, batched):
        assert b.dtype == torch.float32 and b.is_contiguous()
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["wav2vec2", "hubert", "wavlm", "data2vec"])
def test_plain_padding_is_not_exact_where_the_originals_are_not(name: str) -> None:
    """Why the exact mode exists: with the originals' padding (fairseq, transformers) a GroupNorm front end
    normalises over the padding, fairseq HuBERT's chunk rule miscounts frames, and data2vec's positional conv
    stack leaks padding into the last real frames; the rows then depend on their batch."""
    model = our_tiny(name)
    wavs = _waveforms([2000, 1290, 999])
    source = torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True)  # (3, 2000)
    padding = torch.arange(source.shape[1])[None, :] >= torch.tensor([2000, 1290, 999])[:, None]
    with torch.inference_mode():
        plain = model.extract_features(source, padding, output_layer=2)
        exact = model.extract_features(source, padding, output_layer=2, exact_padding=True)
        alone = model.extract_features(wavs[2][None], output_layer=2)[0]  # (frames, D)
    frames = alone.shape[0]
    torch.testing.assert_close(exact[2, :frames], alone, atol=1e-5, rtol=1e-5)
    assert (plain[2, :frames] - alone).abs().max() > 1e-2
    # The longest row has no padding: both modes give it what it gives alone.
    torch.testing.assert_close(plain[0], exact[0], atol=1e-5, rtol=1e-5)


def test_length_batches_sort_and_bound_the_padded_size() -> None:
    lengths = [5, 30, 10, 30, 1, 100, 25]
    batches = length_batches(lengths, 60)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [5]  # longer than the bound: alone
    for b in batches:
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 60
    assert length_batches(lengths, 0) == [[i] for i in range(len(lengths))]


class _FailsOnLoud(FeatureReader):
    """A reader that fails on a waveform with a sample above 10, to see where errors land."""

    frame_rate, dim = 100.0, 1

    @classmethod
    def from_options(cls, checkpoint, layer, device) -> _FailsOnLoud:
        return cls()

    def _read(self, wav: torch.Tensor) -> torch.Tensor:
        if wav.abs().max() > 10:
            raise FeatureError("too loud")
        return wav[: len(wav) // 100 * 100].view(-1, 100).mean(1, keepdim=True)


def test_a_failing_batch_is_read_again_one_at_a_time() -> None:
    wavs = _waveforms([400, 300, 500, 200])
    wavs[1] = wavs[1] * 0 + 20.0
    out = read_waveforms(_FailsOnLoud(), wavs, batch_seconds=1.0)
    assert isinstance(out[1], FeatureError) and str(out[1]) == "too loud"
    for i in (0, 2, 3):
        torch.testing.assert_close(out[i], _FailsOnLoud().read(wavs[i]))


def _audio_dir(tmp_path: Path) -> tuple[Path, list[Path], list[int]]:
    """Eight files of varied lengths, the fourth corrupt and the seventh NaN, and a manifest of them."""
    rng = np.random.default_rng(0)
    (tmp_path / "audio").mkdir()
    paths, sizes = [], []
    for i, n in enumerate([3200, 5100, 800, 4000, 2600, 6400, 3000, 1900]):
        path = tmp_path / "audio" / f"{i}.wav"
        if i == 3:
            path.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage that is not audio")
        else:
            wav = (0.3 * np.sin(2 * np.pi * (150 + 90 * i) * np.arange(n) / SR) + 0.05 * rng.standard_normal(n))
            if i == 6:
                wav[10:20] = np.nan
            sf.write(path, wav.astype(np.float32), SR, subtype="FLOAT")
        paths.append(path)
        sizes.append(n)
    manifest = tmp_path / "train.tsv"
    manifest.write_text(f"{tmp_path}\n" + "".join(f"audio/{i}.wav\t{n}\n" for i, n in enumerate(sizes)))
    return manifest, paths, sizes


def test_read_files_keeps_order_and_reports_each_bad_file(tmp_path: Path) -> None:
    _, paths, sizes = _audio_dir(tmp_path)
    reader = HubertFeatureReader(our_tiny("wavlm"), {"normalize": False}, layer=2)
    one = list(read_files(reader, paths, batch_seconds=0))
    # 0.9 s of padded audio per batch: several batches; a window of 8 batches holds every file.
    batched = list(read_files(reader, paths, batch_seconds=0.9, sizes=sizes))
    assert [r.index for r in batched] == list(range(8))
    for a, b in zip(one, batched):
        assert (a.error is None) == (b.error is None) == (a.index not in (3, 6))
        if a.error is None:
            assert a.samples == b.samples == sizes[a.index]
            torch.testing.assert_close(b.feats, a.feats, atol=1e-5, rtol=1e-5)
        else:
            assert str(a.error) == str(b.error) and b.feats is None


@pytest.fixture(scope="module")
def encoder_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny wav2vec 2.0 base (GroupNorm front end) as a HF directory, the audio, and a quantizer."""
    tmp = tmp_path_factory.mktemp("batch_corpus")
    manifest, _, _ = _audio_dir(tmp)
    directory = write_hf_directory(our_tiny("wav2vec2"), tmp / "w2v")
    km = tmp / "km.safetensors"
    features = ["--features", "ssl", "--checkpoint", str(directory), "--layer", "2", "--device", "cpu"]
    assert main(["kmeans", "--manifest", str(manifest), *features, "--k", "6", "--percent", "1.0",
                 "--batch-seconds", "0", "--out", str(km)]) == 0
    return {"manifest": manifest, "km": km, "directory": directory, "root": tmp}


def test_prepare_units_are_the_same_batched_or_not(encoder_corpus: dict[str, Path], tmp_path: Path) -> None:
    features = ["--features", "ssl", "--checkpoint", str(encoder_corpus["directory"]), "--layer", "2",
                "--device", "cpu"]
    outputs = {}
    for batch in ("0", "0.5", "100"):
        out = tmp_path / f"units_{batch}"
        assert main(["prepare", "--manifest", str(encoder_corpus["manifest"]), *features, "--kmeans",
                     str(encoder_corpus["km"]), "--out", str(out), "--batch-seconds", batch]) == 0
        outputs[batch] = (out / "train.units").read_text()
    lines = outputs["0"].split("\n")[:-1]
    assert len(lines) == 8 and lines[3] == lines[6] == "" and all(lines[i] for i in (0, 1, 2, 4, 5, 7))
    assert outputs["0.5"] == outputs["0"] == outputs["100"]


def test_kmeans_features_are_the_same_batched_or_not(encoder_corpus: dict[str, Path]) -> None:
    reader = build_feature_reader("ssl", encoder_corpus["directory"], layer=2)
    one, info_one = collect_features(encoder_corpus["manifest"], reader, batch_seconds=0)
    batched, info = collect_features(encoder_corpus["manifest"], reader, batch_seconds=0.5)
    assert info == info_one and [s["row"] for s in info["skipped"]] == [3, 6]
    np.testing.assert_allclose(batched, one, atol=1e-5, rtol=1e-5)


def test_bf16_encoder_reader_and_refusals(encoder_corpus: dict[str, Path], capsys) -> None:
    fp32 = build_feature_reader("ssl", encoder_corpus["directory"], layer=2)
    bf16 = build_feature_reader("ssl", encoder_corpus["directory"], layer=2, dtype="bf16")
    assert bf16.describe()["dtype"] == "bfloat16" and fp32.describe()["dtype"] == "float32"
    wavs = _waveforms([2000, 1500, 900])
    for a, b, c in zip(fp32.read_batch(wavs), bf16.read_batch(wavs), [bf16.read(w) for w in wavs]):
        assert b.dtype == torch.float32 and b.shape == a.shape
        torch.testing.assert_close(b, c, atol=0.1, rtol=0.05)  # batched bf16 ~ one-at-a-time bf16
        assert (b - a).abs().max() < 0.1 * a.abs().max()  # bf16 rounding, not another feature
    with pytest.raises(FeatureError, match="float32 only"):
        build_feature_reader("mfcc", dtype="bf16")
    rc = main(["kmeans", "--manifest", str(encoder_corpus["manifest"]), "--features", "logmel", "--dtype", "bf16",
               "--k", "2", "--out", str(encoder_corpus["root"] / "x.safetensors")])
    assert rc == 2 and "float32 only" in capsys.readouterr().err
    rc = main(["prepare", "--manifest", str(encoder_corpus["manifest"]), "--features", "logmel", "--kmeans",
               str(encoder_corpus["km"]), "--out", str(encoder_corpus["root"] / "u"), "--batch-seconds", "-1"])
    assert rc == 2 and "--batch-seconds must be >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("exact", [True, False])
def test_superb_batches_equal_one_at_a_time_in_exact_mode(encoder_corpus: dict[str, Path], exact: bool) -> None:
    from speechprompt.superb import build_superb

    model, _ = build_superb(str(encoder_corpus["directory"]), "linear_probe", "encoder_ctc", ["lo", "hi"],
                            exact_padding=exact)
    model.eval()
    wavs = _waveforms([2000, 1290, 999])
    with torch.inference_mode():
        out, frame_mask = model(*model.prepare(wavs))  # (B, F, V), (B, F)
        alone = [model(*model.prepare([w]))[0][0] for w in wavs]
    assert [int((~m).sum()) for m in frame_mask] == [a.shape[0] for a in alone]
    diff = max(float((out[i, : a.shape[0]] - a).abs().max()) for i, a in enumerate(alone))
    assert diff < 1e-5 if exact else diff > 1e-3  # a GroupNorm front end sees the padding unless exact
