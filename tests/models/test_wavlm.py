"""WavLM: the wav2vec 2.0-family encoder with a gated relative position bias (the ``attn_bias`` hook of the shared
transformer layer), loaded from Hugging Face directories and from WavLM's official format (a plain state dict with
fairseq-like names and a flat ``cfg`` dict).

transformers builds the tiny models (a test-only oracle, in-process). The official format is written from the same
weights under WavLM's own names (ours: the key table of speechprompt.models.hf_keys, read backwards), as the
original repository saves them.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_encoders import CTC_VOCAB, HF_CONFIGS, TINY_CONV, build_hf, hf_hidden, our_tiny, save_hf, waveforms

from speechprompt.config import to_dict
from speechprompt.errors import CheckpointError
from speechprompt.models.encoders import load_encoder
from speechprompt.models.heads import CTCOutput
from speechprompt.models.transformer import LayerKV, MultiheadAttention
from speechprompt.models.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # transformers' WavLM passes torch a float bias and a bool padding mask; not ours to fix.
              pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask:UserWarning")]

WAVLM = [n for n in HF_CONFIGS if n.startswith("wavlm")]
ATOL = 1e-5


def _close(got: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor | None) -> None:
    assert got.shape == expected.shape
    if mask is None:
        torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    else:
        torch.testing.assert_close(got[~mask], expected[~mask], rtol=0, atol=ATOL)


@pytest.fixture(scope="module")
def hf_wavlm(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("hf_wavlm")
    out = {}
    for i, name in enumerate(WAVLM):
        model = build_hf(name, seed=10 + i)
        out[name] = (model, save_hf(model, root / name))
    return out


@pytest.mark.transformers
@pytest.mark.parametrize("name", WAVLM)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_hf_every_layer_matches(hf_wavlm, name, padded):
    hf, directory = hf_wavlm[name]
    enc = load_encoder(directory)
    assert enc.architecture == "wavlm" and enc.model.cfg.relative_position_embedding
    assert hasattr(enc.model.encoder.layers[0].self_attn, "relative_attention_bias")
    assert not hasattr(enc.model.encoder.layers[1].self_attn, "relative_attention_bias")
    source, padding = waveforms()
    pad = padding if padded else None
    expected = hf_hidden(hf, source, pad)
    with torch.no_grad():
        hidden, mask = enc.model.hidden_states(source, pad)
        final = enc.model.extract_features(source, pad)
    assert len(hidden) == len(expected.hidden_states)
    for ours, theirs in zip(hidden, expected.hidden_states):
        _close(ours, theirs, mask)
    _close(final, expected.last_hidden_state, mask)


def _official(model, normalize: bool) -> dict:
    """WavLM's own checkpoint layout: ``cfg`` is its flat WavLMConfig (with keys that do not matter here too)."""
    cfg = {k: v for k, v in to_dict(model.cfg).items()
           if k not in ("frame_padding", "feature_layer_norm", "always_project", "has_mask_emb", "layer_norm_eps")}
    cfg.update(normalize=normalize, mask_prob=0.65, mask_length=10, encoder_layerdrop=0.05, feature_grad_mult=0.1)
    return {"cfg": cfg, "model": model.state_dict()}


@pytest.mark.transformers
@pytest.mark.parametrize("name", WAVLM)
def test_official_checkpoint_matches_transformers(hf_wavlm, tmp_path, name):
    hf, directory = hf_wavlm[name]
    ours = load_encoder(directory).model
    path = tmp_path / "WavLM-tiny.pt"
    torch.save(_official(ours, normalize=name == "wavlm_large"), path)
    enc = load_encoder(path)
    assert enc.source == "wavlm" and enc.architecture == "wavlm"
    assert enc.task_cfg["normalize"] is (name == "wavlm_large")
    assert enc.model.cfg.num_buckets == ours.cfg.num_buckets and enc.model.cfg.max_distance == ours.cfg.max_distance
    source, padding = waveforms()
    expected = hf_hidden(hf, source, padding)
    with torch.no_grad():
        final = enc.model.extract_features(source, padding)
    _close(final, expected.last_hidden_state, enc.model.frame_padding_mask(padding, final.shape[1]))


def test_official_checkpoint_with_wrong_weights_is_refused(tmp_path):
    model = our_tiny("wavlm")
    ckpt = _official(model, normalize=False)
    del ckpt["model"]["encoder.layers.0.self_attn.relative_attention_bias.weight"]
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="missing keys: encoder.layers.0.self_attn.relative_attention_bias"):
        load_encoder(tmp_path / "bad.pt")


@pytest.mark.transformers
def test_hf_ctc_logits_match(tmp_path):
    hf = build_hf("wavlm_base", head="ctc", vocab_size=len(CTC_VOCAB), pad_token_id=0)
    enc = load_encoder(save_hf(hf, tmp_path / "ctc", vocab=CTC_VOCAB))
    assert isinstance(enc.head, CTCOutput) and enc.head.vocab == list(CTC_VOCAB)
    source, padding = waveforms()
    with torch.no_grad():
        expected = hf(source, attention_mask=(~padding).long()).logits
    logits, mask = enc.logits(source, padding)
    _close(logits, expected, mask)


def test_attention_bias_leaves_prefix_keys_unbiased():
    """The bias covers the real keys; prefix keys in front get none (as if the bias were zero-padded)."""
    torch.manual_seed(0)
    attn = MultiheadAttention(16, 2).eval()
    x, bias = torch.randn(2, 5, 16), torch.randn(2, 2, 5, 5)
    prefix = LayerKV(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))
    got = attn(x, prefix=prefix, attn_bias=bias)
    q = attn._heads(attn.q_proj(x))
    k = torch.cat([prefix.key.expand(2, -1, -1, -1), attn._heads(attn.k_proj(x))], dim=2)
    v = torch.cat([prefix.value.expand(2, -1, -1, -1), attn._heads(attn.v_proj(x))], dim=2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8) + torch.cat([torch.zeros(2, 2, 5, 3), bias], dim=-1)
    expected = attn.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    no_bias = attn(x, prefix=prefix)
    assert (no_bias - got).abs().max() > 1e-3


def test_prefix_and_padding_with_relative_bias():
    """WavLM with a prefix: padded frames stay invisible, and the prefix changes the real frames."""
    torch.manual_seed(0)
    # A LayerNorm front end: a GroupNorm one takes statistics over the padding too (as in the originals).
    model = Wav2Vec2Model(Wav2Vec2Config(conv_feature_layers=TINY_CONV, encoder_layers=2, encoder_embed_dim=32,
                                         encoder_ffn_embed_dim=64, encoder_attention_heads=4, conv_pos=8,
                                         conv_pos_groups=4, extractor_mode="layer_norm",
                                         relative_position_embedding=True, num_buckets=16, max_distance=40)).eval()
    source, padding = waveforms()
    prefix = [LayerKV(torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8)) for _ in range(model.num_layers)]
    changed = source.clone()
    changed[1, 1700:] = 3.0  # only padding (and no real frame's receptive field) changes
    with torch.no_grad():
        a = model.extract_features(source, padding, prefix=prefix)
        b = model.extract_features(changed, padding, prefix=prefix)
        plain = model.extract_features(source, padding)
    real = ~model.frame_padding_mask(padding, a.shape[1])
    torch.testing.assert_close(a[real], b[real], rtol=0, atol=1e-6)
    assert (a[real] - plain[real]).abs().max() > 1e-3
