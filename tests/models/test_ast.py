"""The Audio Spectrogram Transformer: its fbank front end against transformers' ``ASTFeatureExtractor`` (1e-4), and the
model, loaded from Hugging Face directories (transformers 4 and 5 weight names, with and without the audio
classification head), against transformers' ``ASTModel``/``ASTForAudioClassification`` (1e-5).

transformers is a test-only oracle here (in-process); without torchaudio its feature extractor computes the Kaldi
fbank in numpy, independently of ours.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_encoders import our_tiny, randomize, save_hf, waveforms

from speechprompt.models.ast import ASTConfig
from speechprompt.models.encoders import load_encoder
from speechprompt.models.heads import ASTClassifier

pytestmark = pytest.mark.usefixtures("one_thread")

SR = 16000


def _clips(seconds: list[float], seed: int = 0) -> list[np.ndarray]:
    """Noise plus a chirp, so that every mel bin has energy that changes over time."""
    rng = np.random.default_rng(seed)
    out = []
    for s in seconds:
        t = np.arange(int(s * SR)) / SR
        chirp = 0.3 * np.sin(2 * np.pi * (200 + 3000 * t / max(s, 1e-3)) * t)
        out.append((chirp + 0.05 * rng.standard_normal(len(t))).astype(np.float32))
    return out


def _batch(clips: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(c) for c in clips)
    wav, pad = torch.zeros(len(clips), T), torch.ones(len(clips), T, dtype=torch.bool)
    for i, c in enumerate(clips):
        wav[i, : len(c)], pad[i, : len(c)] = torch.from_numpy(c), False
    return wav, pad


@pytest.mark.transformers
@pytest.mark.filterwarnings("ignore:At least one mel filter has all zero values")  # 128 filters: Kaldi's too
@pytest.mark.parametrize("preset,seconds", [
    ("audioset", [10.0, 3.3, 11.0]),  # 10.24 s clips: padded, and truncated past 1024 frames
    ("speech_commands", [1.0, 0.6, 1.5]),  # keyword clips: 128 frames
])
def test_fbank_front_end_matches_ast_feature_extractor(preset, seconds):
    import transformers
    from transformers.utils import is_speech_available

    assert not is_speech_available()  # the numpy fbank, not torchaudio's Kaldi port
    cfg = getattr(ASTConfig, preset)()
    extractor = transformers.ASTFeatureExtractor(num_mel_bins=cfg.num_mel_bins, max_length=cfg.max_length,
                                                 mean=cfg.mean, std=cfg.std)
    clips = _clips(seconds)
    expected = extractor(clips, sampling_rate=SR, return_tensors="pt")["input_values"]
    model = our_tiny("ast")
    model.cfg = cfg  # only the front end runs
    wav, pad = _batch(clips)
    got = model.spectrogram(wav, pad)
    assert got.shape == expected.shape == (3, cfg.max_length, cfg.num_mel_bins)
    torch.testing.assert_close(got, expected.float(), rtol=0, atol=1e-4)


def _hf_ast(head: bool, seed: int, **config):
    import transformers

    cfg = transformers.ASTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                 **config)
    torch.manual_seed(seed)
    model = (transformers.ASTForAudioClassification if head else transformers.ASTModel)(cfg).eval()
    randomize(model, seed + 1)
    return model


CONFIGS = {
    # The AudioSet-style classifier (transformers 4 names, the default on save), its fbank statistics in
    # preprocessor_config.json; overlapping patches with different strides.
    "classifier": dict(head=True, names="v4", preprocessor=dict(mean=-6.0, std=5.0),
                       config=dict(num_mel_bins=32, max_length=64, frequency_stride=8, time_stride=6,
                                   id2label={0: "dog", 1: "rain", 2: "speech"},
                                   label2id={"dog": 0, "rain": 1, "speech": 2})),
    # A bare model in transformers 5 names, no preprocessor_config.json (AudioSet statistics), short clips.
    "bare": dict(head=False, names="v5", preprocessor=None,
                 config=dict(num_mel_bins=24, max_length=40, frequency_stride=4, time_stride=12, layer_norm_eps=1e-6)),
}


@pytest.mark.transformers
@pytest.mark.parametrize("name", list(CONFIGS))
def test_model_matches_transformers(tmp_path, name):
    import transformers

    spec = CONFIGS[name]
    hf = _hf_ast(spec["head"], seed=len(name), **spec["config"])
    extractor = transformers.ASTFeatureExtractor(num_mel_bins=spec["config"]["num_mel_bins"],
                                                 max_length=spec["config"]["max_length"],
                                                 **(spec["preprocessor"] or {}))
    directory = save_hf(hf, tmp_path / name, save_original_format=spec["names"] == "v4",
                        preprocessor=extractor.to_dict() if spec["preprocessor"] else None)
    enc = load_encoder(directory)
    assert enc.architecture == "ast" and enc.task_cfg["normalize"] is False
    assert (enc.model.cfg.mean, enc.model.cfg.std) == (extractor.mean, extractor.std)

    clips = _clips([0.5, 0.3, 0.2], seed=len(name))
    wav, pad = _batch(clips)
    inputs = extractor(clips, sampling_rate=SR, return_tensors="pt")["input_values"].float()
    with torch.no_grad():
        expected = hf(inputs, output_hidden_states=True)
        hidden, mask = enc.model.hidden_states(wav, pad)
        final = enc.model.extract_features(wav, pad)
    assert mask is not None and not mask.any() and mask.shape == hidden[0].shape[:2]
    assert len(hidden) == len(expected.hidden_states) == 3
    for ours, theirs in zip(hidden, expected.hidden_states):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    if spec["head"]:
        assert isinstance(enc.head, ASTClassifier) and enc.head.labels == ["dog", "rain", "speech"]
        logits, _ = enc.logits(wav, pad)
        torch.testing.assert_close(logits, expected.logits, rtol=0, atol=1e-5)
        assert enc.classify(wav, pad) == [enc.head.labels[i] for i in expected.logits.argmax(-1).tolist()]
    else:
        assert enc.head is None
        torch.testing.assert_close(final, expected.last_hidden_state, rtol=0, atol=1e-5)


def test_batch_equals_utterances_alone():
    """Each row's fbank covers its own samples: padding a clip into a batch changes nothing."""
    model = our_tiny("ast")
    wav, pad = waveforms(samples=6000)
    with torch.no_grad():
        batch = model.extract_features(wav, pad)
        alone = model.extract_features(wav[1:2, : int((~pad[1]).sum())])
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="fbank frame"):
        model.extract_features(torch.randn(1, 300))
