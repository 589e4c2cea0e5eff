"""Feature readers: the registry, descriptions, and the HuBERT reader against fairseq's GSLM reader (run as an oracle
in its own environment, see tests/oracle.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from oracle import run_oracle

from speechprompt.audio import load_audio
from speechprompt.data_prep import features
from speechprompt.data_prep.features import (
    FeatureError,
    FeatureReader,
    HubertFeatureReader,
    build_feature_reader,
    feature_mismatch,
    feature_reader_names,
    register_feature_reader,
)
from speechprompt.fairseq_compat import save_fairseq_checkpoint
from speechprompt.models.hubert import ExtractorMode, HubertConfig, HubertModel


def _tiny_checkpoint(path: Path, normalize: bool, seed: int = 0) -> HubertModel:
    """A 2-layer, 32-wide HuBERT saved in fairseq's checkpoint layout (receptive field 100, hop 80 samples)."""
    torch.manual_seed(seed)
    model = HubertModel(HubertConfig.tiny()).eval()
    model_cfg = {k: (v.value if isinstance(v, ExtractorMode) else v) for k, v in vars(model.cfg).items()}
    save_fairseq_checkpoint(path, model.state_dict(), {"model": {"_name": "hubert", **model_cfg},
                                                        "task": {"normalize": normalize, "sample_rate": 16000}})
    return model


def _wav(n: int, seed: int = 0) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def test_registry_builds_readers_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert {"hubert", "mfcc", "mfcc_cmn", "logmel"} <= set(feature_reader_names())
    assert build_feature_reader("mfcc").dim == build_feature_reader("mfcc_cmn").dim == 39
    assert build_feature_reader("logmel").dim == 80
    with pytest.raises(FeatureError, match="unknown feature reader 'cpc'"):
        build_feature_reader("cpc")

    class Energy(FeatureReader):
        frame_rate = 100.0
        dim = 1

        @classmethod
        def from_options(cls, checkpoint, layer, device):
            return cls()

        def _read(self, wav):
            return wav[: len(wav) // 160 * 160].view(-1, 160).pow(2).mean(1, keepdim=True)  # (frames, 1)

    monkeypatch.setattr(features, "_READERS", dict(features._READERS))
    register_feature_reader("energy", Energy)
    reader = build_feature_reader("energy")
    assert reader.read(np.ones(480, np.float32)).tolist() == [[1.0], [1.0], [1.0]]
    assert reader.describe()["name"] == "energy"
    with pytest.raises(ValueError, match="already registered"):
        register_feature_reader("energy", type("Other", (Energy,), {}))


def test_spectral_readers_take_no_model_options() -> None:
    with pytest.raises(FeatureError, match="takes neither"):
        build_feature_reader("mfcc", checkpoint="x.pt")
    with pytest.raises(FeatureError, match="takes neither"):
        build_feature_reader("logmel", layer=6)
    with pytest.raises(FeatureError, match="the mfcc_cmn reader takes neither"):
        build_feature_reader("mfcc_cmn", layer=6)


def test_cepstral_mean_normalisation_removes_a_fixed_channel() -> None:
    # Speech-like: noise through a random resonance, louder in the middle.
    rng = np.random.default_rng(0)
    x = np.convolve(rng.standard_normal(8000), rng.standard_normal(40) * np.exp(-np.arange(40) / 8), "same")
    wav = (0.1 * x * np.hanning(len(x))).astype(np.float32)
    channel = np.array([1.0, -0.6, 0.2])  # a fixed filter and a gain: another microphone or synthesizer
    other = (0.5 * np.convolve(wav, channel, "same")).astype(np.float32)
    plain, cmn = build_feature_reader("mfcc"), build_feature_reader("mfcc_cmn")
    a, b = cmn.read(wav), cmn.read(other)
    torch.testing.assert_close(a, plain.read(wav) - plain.read(wav).mean(0), rtol=0, atol=1e-5)
    torch.testing.assert_close(a.mean(0), torch.zeros(39), rtol=0, atol=1e-4)
    # The channel moves the plain cepstra far more than the normalised ones (not to zero: the filter is not
    # exactly a constant in the log-mel domain, and the energy floor is not scale-free).
    static = slice(0, 13)
    moved_plain = (plain.read(wav) - plain.read(other))[:, static].abs().mean()
    moved_cmn = (a - b)[:, static].abs().mean()
    assert moved_cmn < 0.25 * moved_plain
    assert cmn.describe()["name"] == "mfcc_cmn"
    assert "name 'mfcc' vs 'mfcc_cmn'" in feature_mismatch(plain.describe(), cmn.describe())


def test_read_checks_shape_and_runs_without_autograd() -> None:
    reader = build_feature_reader("logmel")
    out = reader.read(torch.from_numpy(_wav(1600)).requires_grad_())
    assert out.shape == (8, 80) and torch.is_inference(out)
    with pytest.raises(FeatureError, match="mono"):
        reader.read(np.zeros((2, 1600), np.float32))


def test_feature_mismatch_ignores_where_a_checkpoint_lives() -> None:
    a = {"name": "hubert", "dim": 768, "layer": 6, "fingerprint": "sha256:1", "checkpoint": "/a/h.pt"}
    assert feature_mismatch(a, {**a, "checkpoint": "/b/h.pt"}) is None
    assert feature_mismatch(a, {**a, "layer": 9}) == "layer 6 vs 9"
    assert "fingerprint" in feature_mismatch(a, {**a, "fingerprint": "sha256:2"})
    assert "name 'hubert' vs 'mfcc'" in feature_mismatch(a, {"name": "mfcc", "dim": 39})


@pytest.mark.parametrize("normalize", [False, True])
def test_hubert_reader_reads_the_requested_layer(tmp_path: Path, normalize: bool) -> None:
    path = tmp_path / "hubert.pt"
    model = _tiny_checkpoint(path, normalize)
    reader = build_feature_reader("hubert", checkpoint=path, layer=1)
    wav = _wav(4000)
    x = torch.from_numpy(wav)
    if normalize:
        x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-5)
    with torch.no_grad():
        expected = model.extract_features(x[None], output_layer=1)[0]
    got = reader.read(wav)
    assert got.shape == (49, 32) and reader.dim == 32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    desc = reader.describe()
    assert desc["layer"] == 1 and desc["normalize"] is normalize and desc["dim"] == 32
    assert desc["fingerprint"] == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert desc["checkpoint"] == str(path.resolve())


def test_hubert_reader_encodes_chunks_separately(tmp_path: Path) -> None:
    path = tmp_path / "hubert.pt"
    model = _tiny_checkpoint(path, normalize=True)
    reader = build_feature_reader("hubert", checkpoint=path, layer=2)
    reader.max_chunk = 1000
    wav = _wav(3050)  # chunks of 1000, 1000, 1000 and a 50-sample sliver below the receptive field (100)
    x = torch.nn.functional.layer_norm(torch.from_numpy(wav), (3050,))  # over the whole file, before chunking
    with torch.no_grad():
        parts = [model.extract_features(x[None, s : s + 1000], output_layer=2)[0] for s in (0, 1000, 2000)]
    got = reader.read(wav)
    assert got.shape == (3 * 12, 32)
    torch.testing.assert_close(got, torch.cat(parts), rtol=1e-5, atol=1e-5)
    assert reader.read(_wav(60)).shape == (0, 32)  # shorter than one frame: no frames, no crash


def test_hubert_reader_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FeatureError, match="needs --checkpoint"):
        build_feature_reader("hubert")
    with pytest.raises(FeatureError, match="does not exist"):
        build_feature_reader("hubert", checkpoint=tmp_path / "nope.pt", layer=1)
    _tiny_checkpoint(tmp_path / "h.pt", normalize=False)
    with pytest.raises(FeatureError, match=r"layer 3 is out of range.*1\.\.2"):
        build_feature_reader("hubert", checkpoint=tmp_path / "h.pt", layer=3)


@pytest.fixture(scope="module")
def fairseq_gslm(tmp_path_factory) -> tuple[Path, dict[bool, tuple[Path, dict]]]:
    """A 3-layer fairseq HuBERT saved by fairseq (with and without waveform normalisation in its task config), and the
    features of fairseq's GSLM ``HubertFeatureReader.get_feats`` (layer 2, chunks of 1000 samples) for one wav file,
    from one oracle run (tests/oracles/fairseq/hubert.py). Returns the wav and ``{normalize: (checkpoint, ref)}``."""
    out = tmp_path_factory.mktemp("fairseq_gslm")
    audio = out / "utt.wav"
    sf.write(audio, _wav(3500, seed=3), 16000)  # PCM16: both readers see the same samples
    model = dict(encoder_layers=3, encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=4,
                 conv_pos=8, conv_pos_groups=4, final_dim=8,
                 conv_feature_layers="[(16,10,5)] + [(16,3,2)] * 2 + [(16,2,2)] * 2")
    gslm = {"audio": str(audio), "layer": 2, "max_chunk": 1000}
    models = {f"normalize_{n}": {"model": model, "task": {"label_rate": 50.0, "normalize": n}, "dict_sizes": [10],
                                 "checkpoint": "container", "gslm": gslm}
              for n in (False, True)}
    run_oracle("fairseq", "hubert", out, models=models)
    return audio, {n: (out / f"normalize_{n}.pt", torch.load(out / f"normalize_{n}.ref.pt", weights_only=True))
                   for n in (False, True)}


@pytest.mark.fairseq
@pytest.mark.parametrize("normalize", [False, True])
def test_hubert_reader_matches_fairseq_gslm_reader(fairseq_gslm, normalize: bool) -> None:
    """fairseq's own HubertModel and GSLM HubertFeatureReader.get_feats as the oracle, chunking included."""
    audio, models = fairseq_gslm
    ckpt, ref = models[normalize]
    ours = HubertFeatureReader.from_checkpoint(ckpt, layer=2)
    ours.max_chunk = 1000
    assert ours.describe()["normalize"] is normalize
    expected = ref["gslm_features"]
    got = ours.read(load_audio(audio))
    assert got.shape == expected.shape == (3 * 12 + 6, 32)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
