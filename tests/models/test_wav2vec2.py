"""Tests for the wav2vec 2.0-family encoder (speechprompt.models.wav2vec2) and its loading by load_encoder: fairseq
wav2vec 2.0, data2vec-style and CTC fine-tuned checkpoints, and Hugging Face wav2vec2/hubert/data2vec-audio
directories with their heads.

Parity: fairseq builds tiny models with its own classes in its own environment (tests/oracles/fairseq/
wav2vec2_family.py, through tests/oracle.py) and saves them in its format; transformers builds tiny models in-process
(a test-only oracle) and saves them with ``save_pretrained``. Ours load them and must give every layer's output at
1e-5, with and without padding, and the same CTC logits and text.
"""

from __future__ import annotations

import pytest
import torch
from oracle import run_oracle
from tiny_encoders import (
    CTC_VOCAB,
    HF_CONFIGS,
    build_hf,
    hf_hidden,
    our_tiny,
    save_hf,
    waveforms,
)

from speechprompt.config import ConfigError
from speechprompt.errors import CheckpointError
from speechprompt.models.encoders import load_encoder
from speechprompt.models.heads import CTCOutput, SequenceClassifier
from speechprompt.models.hubert import HubertModel
from speechprompt.models.wav2vec2 import (
    ExtractorMode,
    FramePadding,
    Wav2Vec2Config,
    Wav2Vec2Model,
    normalize_waveform,
    relative_position_buckets,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_CONV = "[(16,10,5)] + [(16,3,2)] * 2 + [(16,2,2)] * 2"
ATOL = 1e-5


def _close_at_real_frames(got: torch.Tensor, expected: torch.Tensor, frame_mask: torch.Tensor | None) -> None:
    assert got.shape == expected.shape
    if frame_mask is None:
        torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    else:
        assert frame_mask.any() and not frame_mask.all()
        torch.testing.assert_close(got[~frame_mask], expected[~frame_mask], rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------------------------------
# Config and model alone


def test_config_from_fairseq_keeps_what_matters_and_refuses_other_architectures():
    cfg = Wav2Vec2Config.from_fairseq({"_name": "wav2vec2", "extractor_mode": "layer_norm", "encoder_layers": 3,
                                       "quantize_targets": True, "latent_vars": 320, "mask_prob": 0.65,
                                       "pos_conv_depth": 5, "conv_pos": 95, "required_seq_len_multiple": 2})
    assert cfg.extractor_mode is ExtractorMode.LAYER_NORM and cfg.encoder_layers == 3 and cfg.pos_conv_depth == 5
    for key, value in [("layer_type", "conformer"), ("conv_pos_batch_norm", True), ("quantize_input", True),
                       ("crop_seq_to_multiple", 2)]:
        with pytest.raises(ConfigError, match=key):
            Wav2Vec2Config.from_fairseq({key: value})


def test_data2vec_positional_convs_follow_fairseq_kernel_rule():
    model = Wav2Vec2Model(Wav2Vec2Config(conv_feature_layers=TINY_CONV, encoder_layers=1, encoder_embed_dim=32,
                                         encoder_ffn_embed_dim=64, encoder_attention_heads=4, conv_pos=95,
                                         pos_conv_depth=5, conv_pos_groups=4))
    convs = [block[0] for block in model.encoder.pos_conv]
    assert len(convs) == 5 and all(c.kernel_size == (19,) for c in convs)  # max(3, 95 // 5)
    assert "encoder.pos_conv.4.0.weight" in model.state_dict()


def test_frame_padding_rules():
    lengths_model = our_tiny("wav2vec2")
    chunks_model = our_tiny("hubert")
    assert chunks_model.cfg.frame_padding == FramePadding.CHUNKS == "chunks"
    assert lengths_model.cfg.frame_padding == FramePadding.LENGTHS == "lengths"
    pad = torch.zeros(2, 1000, dtype=torch.bool)
    pad[1, 500:] = True  # 500 real samples: 99, 49, 24, 12, then 6 frames through the convs
    by_lengths = lengths_model.frame_padding_mask(pad, 12)
    assert by_lengths[1].tolist() == [False] * 6 + [True] * 6 and not by_lengths[0].any()
    by_chunks = chunks_model.frame_padding_mask(pad, 12)  # chunks of 83 samples: 7 hold a real one
    assert by_chunks[1].tolist() == [False] * 7 + [True] * 5


def test_pretraining_tensors_are_kept_inert_and_removed():
    model = our_tiny("wav2vec2")
    extra = {"quantizer.vars": torch.randn(1, 8, 4), "quantizer.weight_proj.weight": torch.randn(8, 16),
             "project_q.bias": torch.randn(8)}
    model.keep_pretraining_tensors(extra)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in extra.items())
    assert not any(k.startswith(("quantizer", "project_q")) for k, _ in model.named_parameters())
    model.remove_pretraining_modules()
    assert not any(k.startswith(("quantizer", "project_q")) for k in model.state_dict())
    with pytest.raises(ValueError, match="clashes"):
        model.keep_pretraining_tensors({"encoder.foo": torch.zeros(1)})


def test_normalize_waveform_epsilon():
    wav = torch.randn(1000) * 0.01
    fairseq = normalize_waveform(wav, {"normalize": True})
    hf = normalize_waveform(wav, {"normalize": True, "normalize_eps": 1e-7})
    expected = (wav - wav.mean()) / torch.sqrt(wav.var(unbiased=False) + 1e-7)  # HF's feature extractor
    torch.testing.assert_close(hf, expected, rtol=0, atol=1e-5)
    assert (fairseq - hf).abs().max() > 1e-3  # the epsilon matters at this level


def test_relative_position_buckets_are_symmetric_and_saturate():
    rel = torch.arange(-50, 51)
    b = relative_position_buckets(rel, num_buckets=16, max_distance=40)
    assert b[50] == 0 and b[51] == 9 and b[49] == 1  # 0; +1 in the upper half; -1 in the lower half
    assert b.max() == 15 and b.min() == 0 and b[-1] == 15 and b[0] == 7  # beyond max_distance: the last bucket


# ---------------------------------------------------------------------------------------------------------------
# Parity with fairseq

LAYERS = [1, 2, 3]
FAIRSEQ_MODELS = {
    # wav2vec 2.0 base: post-LN, GroupNorm front end, conv width != D, odd positional kernel, with its quantizer.
    "w2v_base": dict(kind="pretrain", name="wav2vec2", normalize=False, randomize_seed=1, model=dict(
        extractor_mode="default", layer_norm_first=False, conv_feature_layers=TINY_CONV, encoder_layers=3,
        encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=4, conv_pos=7, conv_pos_groups=4,
        final_dim=8, quantize_targets=True, latent_vars=4, latent_groups=2, latent_dim=8)),
    # LV-60 / XLS-R: pre-LN, LayerNorm front end with bias, conv width == D (no post_extract_proj), even kernel.
    "w2v_large": dict(kind="pretrain", name="wav2vec2", normalize=True, randomize_seed=2, model=dict(
        extractor_mode="layer_norm", layer_norm_first=True, conv_bias=True,
        conv_feature_layers="[(32,10,5)] + [(32,3,2)] * 2 + [(32,2,2)] * 2", encoder_layers=3,
        encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=4, conv_pos=8, conv_pos_groups=4,
        final_dim=8, latent_vars=4, latent_groups=2, latent_dim=8)),
    # data2vec-audio's encoder: fairseq's TransformerEncoder with a stack of 3 layer-normed convs (kernel 15 // 3).
    "d2v": dict(kind="pretrain", name="data2vec_audio", normalize=True, randomize_seed=3, model=dict(
        extractor_mode="layer_norm", layer_norm_first=False, conv_feature_layers=TINY_CONV, encoder_layers=3,
        encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=4, conv_pos=15, pos_conv_depth=3,
        conv_pos_groups=4, final_dim=8)),
    # CTC fine-tuned wav2vec 2.0 (pre-LN), letters in task_state.
    "w2v_ctc": dict(kind="wav2vec_ctc", normalize=True, randomize_seed=4, letters=list("|ABCDE"),
                    dictionary="task_state", model=dict(
                        extractor_mode="layer_norm", layer_norm_first=True, conv_bias=True,
                        conv_feature_layers="[(32,10,5)] + [(32,3,2)] * 2 + [(32,2,2)] * 2", encoder_layers=2,
                        encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=4, conv_pos=8,
                        conv_pos_groups=4)),
    # CTC fine-tuned HuBERT (post-LN, fairseq HuBERT's padding rule), letters in dict.ltr.txt beside the file.
    "hub_ctc": dict(kind="hubert_ctc", normalize=False, randomize_seed=5, letters=list("|EHLO"), dictionary="file",
                    model=dict(conv_feature_layers=TINY_CONV, encoder_layers=2, encoder_embed_dim=32,
                               encoder_ffn_embed_dim=64, encoder_attention_heads=4, conv_pos=7, conv_pos_groups=4)),
}
PRETRAIN = [n for n, s in FAIRSEQ_MODELS.items() if s["kind"] == "pretrain"]
CTC = [n for n, s in FAIRSEQ_MODELS.items() if s["kind"] != "pretrain"]


@pytest.fixture(scope="module")
def fairseq_family(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("fairseq_w2v")
    source, padding = waveforms()
    torch.save({"source": source, "padding": padding}, out / "inputs.pt")
    run_oracle("fairseq", "wav2vec2_family", out, models=FAIRSEQ_MODELS, inputs=str(out / "inputs.pt"),
               layers=LAYERS)
    refs = {name: torch.load(out / name / "ref.pt", weights_only=True) for name in FAIRSEQ_MODELS}
    return out, refs, source, padding


@pytest.mark.fairseq
@pytest.mark.parametrize("name", PRETRAIN)
def test_fairseq_pretraining_checkpoint_layers_match(fairseq_family, name):
    out, refs, source, padding = fairseq_family
    enc = load_encoder(out / name / "checkpoint.pt")
    spec = FAIRSEQ_MODELS[name]
    assert enc.source == "fairseq" and enc.architecture == spec["name"] and enc.head is None
    assert bool(enc.task_cfg.get("normalize")) is spec["normalize"]
    ref = refs[name]
    with torch.no_grad():
        for case, pad in (("unpadded", None), ("padded", padding)):
            for layer in [*LAYERS, None]:
                got = enc.model.extract_features(source, pad, output_layer=layer)
                mask = None
                if pad is not None:
                    mask = enc.model.frame_padding_mask(pad, got.shape[1])
                    assert torch.equal(mask, ref["frame_padding"])
                _close_at_real_frames(got, ref["features"][case][str(layer) if layer else "final"], mask)


@pytest.mark.fairseq
def test_fairseq_pretraining_tensors_round_trip_key_for_key(fairseq_family):
    out, _, _, _ = fairseq_family
    from speechprompt.fairseq_compat import load_fairseq_checkpoint

    stored = load_fairseq_checkpoint(out / "w2v_base" / "checkpoint.pt")["model"]
    model = load_encoder(out / "w2v_base" / "checkpoint.pt").model
    state = model.state_dict()
    assert set(state) == set(stored) and any(k.startswith("quantizer.") for k in state)
    assert all(torch.equal(state[k], stored[k]) for k in stored)
    model.remove_pretraining_modules()
    assert not any(k.startswith(("quantizer.", "project_q.", "final_proj.")) for k in model.state_dict())


@pytest.mark.fairseq
@pytest.mark.parametrize("name", CTC)
def test_fairseq_ctc_logits_and_text_match(fairseq_family, name):
    out, refs, source, padding = fairseq_family
    enc = load_encoder(out / name / "checkpoint.pt")
    spec = FAIRSEQ_MODELS[name]
    assert isinstance(enc.head, CTCOutput) and enc.head.vocab[4:] == spec["letters"]
    assert isinstance(enc.model, HubertModel) == (name == "hub_ctc")
    assert bool(enc.task_cfg["normalize"]) is spec["normalize"]
    ref = refs[name]
    for case, pad in (("unpadded", None), ("padded", padding)):
        logits, mask = enc.logits(source, pad)
        if pad is not None:
            assert torch.equal(mask, ref["frame_padding"])
        _close_at_real_frames(logits, ref["logits"][case], mask)
        assert enc.transcribe(source, pad) == ref["text"][case]


@pytest.mark.fairseq
def test_fairseq_ctc_without_its_dictionary_is_refused(fairseq_family, tmp_path):
    out, _, _, _ = fairseq_family
    lone = tmp_path / "checkpoint.pt"
    lone.write_bytes((out / "hub_ctc" / "checkpoint.pt").read_bytes())
    with pytest.raises(CheckpointError, match="letter dictionary.*dict.ltr.txt"):
        load_encoder(lone)


# ---------------------------------------------------------------------------------------------------------------
# Parity with Hugging Face transformers

HF_FAMILY = [n for n in HF_CONFIGS if not n.startswith("wavlm")]  # WavLM: tests/models/test_wavlm.py


@pytest.fixture(scope="module")
def hf_family(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("hf_w2v")
    out = {}
    for i, name in enumerate(HF_FAMILY):
        model = build_hf(name, seed=i)
        out[name] = (model, save_hf(model, root / name))
    return out


@pytest.mark.transformers
@pytest.mark.parametrize("name", HF_FAMILY)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_hf_every_layer_matches(hf_family, name, padded):
    hf, directory = hf_family[name]
    enc = load_encoder(directory)
    assert enc.source == "huggingface" and enc.head is None
    assert enc.architecture == HF_CONFIGS[name]["model_type"].replace("-", "_")
    source, padding = waveforms()
    pad = padding if padded else None
    expected = hf_hidden(hf, source, pad)
    with torch.no_grad():
        hidden, mask = enc.model.hidden_states(source, pad)
        final = enc.model.extract_features(source, pad)
    assert len(hidden) == len(expected.hidden_states) == enc.model.num_layers + 1
    for ours, theirs in zip(hidden, expected.hidden_states):
        _close_at_real_frames(ours, theirs, mask)
    _close_at_real_frames(final, expected.last_hidden_state, mask)


@pytest.mark.transformers
def test_hf_25hz_hubert_frame_rate(hf_family):
    enc = load_encoder(hf_family["hubert_large_25hz"][1])
    assert enc.model.downsample == 160 and enc.model.frame_rate == 100.0
    assert enc.model.layer_norm is None  # feat_proj_layer_norm: false


@pytest.mark.transformers
def test_hf_ctc_logits_and_text_match(tmp_path):
    import transformers

    hf = build_hf("wav2vec2_large", head="ctc", vocab_size=len(CTC_VOCAB), pad_token_id=0)
    directory = save_hf(hf, tmp_path / "ctc", vocab=CTC_VOCAB,
                        preprocessor={"feature_extractor_type": "Wav2Vec2FeatureExtractor", "do_normalize": True,
                                      "sampling_rate": 16000})
    tokenizer = transformers.Wav2Vec2CTCTokenizer(str(directory / "vocab.json"), word_delimiter_token="|")
    enc = load_encoder(directory)
    assert isinstance(enc.head, CTCOutput) and enc.task_cfg == {"normalize": True, "normalize_eps": 1e-7,
                                                                "sample_rate": 16000}
    source, padding = waveforms()
    for pad in (None, padding):
        with torch.no_grad():
            expected = hf(source, attention_mask=None if pad is None else (~pad).long()).logits
        logits, mask = enc.logits(source, pad)
        _close_at_real_frames(logits, expected, mask)
        texts = []
        for i, row in enumerate(expected.argmax(-1)):
            texts.append(tokenizer.decode(row if mask is None else row[~mask[i]]))
        assert enc.transcribe(source, pad) == texts


@pytest.mark.transformers
@pytest.mark.parametrize("name,weighted", [("hubert_base", True), ("data2vec_b", False)])
def test_hf_sequence_classification_logits_match(tmp_path, name, weighted):
    labels = {0: "yes", 1: "no", 2: "up"}
    hf = build_hf(name, head="classification", num_labels=3, id2label=labels, label2id={v: k for k, v in
                                                                                        labels.items()},
                  use_weighted_layer_sum=weighted, classifier_proj_size=12)
    enc = load_encoder(save_hf(hf, tmp_path / name))
    assert isinstance(enc.head, SequenceClassifier) and enc.head.labels == ["yes", "no", "up"]
    assert (enc.head.layer_weights is not None) is weighted
    source, padding = waveforms()
    for pad in (None, padding):
        with torch.no_grad():
            expected = hf(source, attention_mask=None if pad is None else (~pad).long()).logits
        logits, _ = enc.logits(source, pad)
        torch.testing.assert_close(logits, expected, rtol=0, atol=ATOL)
        assert enc.classify(source, pad) == [labels[i] for i in expected.argmax(-1).tolist()]


@pytest.mark.transformers
def test_hf_pretraining_directory_keeps_quantizer_inert(tmp_path):
    hf = build_hf("wav2vec2_base", head="pretraining")
    enc = load_encoder(save_hf(hf, tmp_path / "pt"))
    state = enc.model.state_dict()
    assert any(k.startswith("quantizer.") for k in state) and any(k.startswith("project_hid.") for k in state)
    source, padding = waveforms()
    with torch.no_grad():
        expected = hf.wav2vec2(source, attention_mask=(~padding).long()).last_hidden_state
        got = enc.model.extract_features(source, padding)
    _close_at_real_frames(got, expected, enc.model.frame_padding_mask(padding, got.shape[1]))
    enc.model.remove_pretraining_modules()
    assert not any(k.startswith(("quantizer.", "project_")) for k in enc.model.state_dict())
