"""The ``hubert``/``ssl`` feature readers on every encoder that load_encoder reads (Hugging Face directories, WavLM's
official files, ...), and ``speechprompt kmeans``/``prepare`` with one of them end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from tiny_encoders import our_tiny, write_hf_directory

from speechprompt.cli import main
from speechprompt.config import to_dict
from speechprompt.data_prep.features import FeatureError, build_feature_reader, checkpoint_fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")

SR = 16000


def _wav(n: int, seed: int = 0) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def test_ssl_reader_on_a_hf_directory(tmp_path: Path) -> None:
    model = our_tiny("wav2vec2")
    directory = write_hf_directory(model, tmp_path / "w2v", preprocessor={"do_normalize": True})
    reader = build_feature_reader("ssl", checkpoint=directory, layer=1)
    wav = _wav(4000)
    x = torch.from_numpy(wav)
    x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)  # HF's do_normalize
    with torch.no_grad():
        expected = model.extract_features(x[None], output_layer=1)[0]
    got = reader.read(wav)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    desc = reader.describe()
    assert desc["name"] == "ssl" and desc["architecture"] == "wav2vec2" and desc["normalize"] is True
    assert desc["frame_rate"] == reader.frame_rate == SR / 80  # the tiny conv stack's stride
    assert desc["fingerprint"] == checkpoint_fingerprint(directory)

    # The fingerprint covers the weights, not the path.
    moved = tmp_path / "moved"
    directory.rename(moved)
    assert checkpoint_fingerprint(moved) == desc["fingerprint"]
    other = write_hf_directory(our_tiny("wav2vec2", seed=5), tmp_path / "other")
    assert checkpoint_fingerprint(other) != desc["fingerprint"]


def test_hubert_reader_name_takes_a_wavlm_checkpoint(tmp_path: Path) -> None:
    model = our_tiny("wavlm")
    cfg = {k: v for k, v in to_dict(model.cfg).items() if k not in ("frame_padding", "has_mask_emb")}
    torch.save({"cfg": {**cfg, "normalize": False}, "model": model.state_dict()}, tmp_path / "WavLM.pt")
    reader = build_feature_reader("hubert", checkpoint=tmp_path / "WavLM.pt", layer=2)
    wav = _wav(3000)
    with torch.no_grad():
        expected = model.extract_features(torch.from_numpy(wav)[None], output_layer=2)[0]
    torch.testing.assert_close(reader.read(wav), expected, rtol=1e-5, atol=1e-5)
    assert reader.describe()["architecture"] == "wavlm"


def test_ast_is_refused_with_the_reason(tmp_path: Path) -> None:
    from speechprompt.data_prep.features import HubertFeatureReader

    with pytest.raises(FeatureError, match="patches of a fixed-length spectrogram"):
        HubertFeatureReader(our_tiny("ast"), {"normalize": False}, layer=1)
    with pytest.raises(FeatureError, match="needs --checkpoint"):
        build_feature_reader("ssl", layer=1)


def test_kmeans_and_prepare_with_a_hf_encoder(tmp_path: Path) -> None:
    directory = write_hf_directory(our_tiny("wav2vec2"), tmp_path / "w2v")
    rows = []
    (tmp_path / "audio").mkdir()
    for i in range(4):
        wav = _wav(3000 + 500 * i, seed=i)
        sf.write(tmp_path / "audio" / f"{i}.wav", wav, SR)
        rows.append(f"audio/{i}.wav\t{len(wav)}")
    manifest = tmp_path / "train.tsv"
    manifest.write_text(f"{tmp_path}\n" + "".join(r + "\n" for r in rows))
    features = ["--features", "ssl", "--checkpoint", str(directory), "--layer", "2", "--device", "cpu"]
    km = tmp_path / "km.safetensors"
    assert main(["kmeans", "--manifest", str(manifest), *features, "--k", "4", "--percent", "1.0",
                 "--out", str(km)]) == 0
    assert main(["prepare", "--manifest", str(manifest), *features, "--kmeans", str(km),
                 "--out", str(tmp_path / "units")]) == 0
    lines = (tmp_path / "units" / "train.units").read_text().splitlines()
    assert len(lines) == 4 and all(lines)
    assert all(0 <= int(u) < 4 for line in lines for u in line.split())
    # A quantizer learned on one layer is refused for another.
    other = ["--features", "ssl", "--checkpoint", str(directory), "--layer", "1", "--device", "cpu"]
    assert main(["prepare", "--manifest", str(manifest), *other, "--kmeans", str(km),
                 "--out", str(tmp_path / "units1")]) == 2
