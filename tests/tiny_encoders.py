"""Tiny encoders for the tests: our own of every architecture, and Hugging Face ones built by transformers itself
(a test-only oracle: imported only inside the functions that need it, by tests marked ``transformers``).

Every model here has 2-3 layers of width 32 and a conv stack of stride 80, so a 0.125 s waveform gives 24 frames.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from speechprompt.models.ast import ASTConfig, ASTModel
from speechprompt.models.hubert import HubertConfig, HubertModel
from speechprompt.models.wav2vec2 import ExtractorMode, Wav2Vec2Config, Wav2Vec2Model

TINY_CONV = "[(16,10,5)] + [(16,3,2)] * 2 + [(16,2,2)] * 2"  # stride 80, receptive field 100 samples
SAMPLES = 2000


def randomize(model: nn.Module, seed: int) -> None:
    """Give every parameter a distinctive random value, so that a swapped or skipped one shows up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g)
                if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                    p.copy_((1.0 if name == "weight" else 0.0) + 0.3 * noise)
                elif name in ("weight_g", "original0"):
                    p.copy_(p * (1.0 + 0.3 * noise.abs()))
                elif name == "bias":
                    p.copy_(0.1 * noise)
                elif isinstance(module, nn.Embedding):
                    p.copy_(noise)
                else:
                    fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                    p.copy_(noise / fan_in**0.5)


def waveforms(batch: int = 3, samples: int = SAMPLES, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch ``(B, T)`` and its padding mask: row 0 full, the others cut at 65% and 39%."""
    g = torch.Generator().manual_seed(seed)
    source = torch.randn(batch, samples, generator=g)
    padding = torch.zeros(batch, samples, dtype=torch.bool)
    for i, frac in zip(range(1, batch), (0.65, 0.39, 0.8)):
        padding[i, int(samples * frac):] = True
    source[padding] = 0.0
    return source, padding


# --------------------------------------------------------------------------------------------------------------
# Ours, one of each architecture (the (encoder x method) tests)


def our_tiny(name: str, seed: int = 0) -> nn.Module:
    """A random tiny encoder of ours: ``wav2vec2`` (post-LN, GroupNorm front end), ``wav2vec2_large`` (pre-LN,
    LayerNorm front end), ``hubert``, ``data2vec`` (layer-normed positional conv stack), ``wavlm`` (gated
    relative position bias) or ``ast``."""
    torch.manual_seed(seed)
    common: dict[str, Any] = dict(conv_feature_layers=TINY_CONV, encoder_layers=2, encoder_embed_dim=32,
                                  encoder_ffn_embed_dim=64, encoder_attention_heads=4, conv_pos=8, conv_pos_groups=4,
                                  dropout=0.0, attention_dropout=0.0)
    if name == "hubert":
        model: nn.Module = HubertModel(HubertConfig.tiny())
    elif name == "wav2vec2":
        model = Wav2Vec2Model(Wav2Vec2Config(**common))
    elif name == "wav2vec2_large":
        model = Wav2Vec2Model(Wav2Vec2Config(**{**common, "extractor_mode": ExtractorMode.LAYER_NORM,
                                                "layer_norm_first": True, "conv_bias": True}))
    elif name == "data2vec":
        model = Wav2Vec2Model(Wav2Vec2Config(**{**common, "extractor_mode": ExtractorMode.LAYER_NORM,
                                                "conv_pos": 10, "pos_conv_depth": 2}), "data2vec_audio")
    elif name == "wavlm":
        model = Wav2Vec2Model(Wav2Vec2Config(**common, relative_position_embedding=True, num_buckets=16,
                                             max_distance=40), "wavlm")
    elif name == "ast":
        model = ASTModel(ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                   num_mel_bins=32, max_length=48))
    else:
        raise ValueError(name)
    randomize(model, seed + 1)
    return model.eval()


OUR_TINY = ["wav2vec2", "wav2vec2_large", "hubert", "data2vec", "wavlm", "ast"]


# --------------------------------------------------------------------------------------------------------------
# Hugging Face, built by transformers


def hf_conv(layers: list[tuple[int, int, int]]) -> dict[str, Any]:
    return {"conv_dim": [d for d, _, _ in layers], "conv_kernel": [k for _, k, _ in layers],
            "conv_stride": [s for _, _, s in layers], "num_feat_extract_layers": len(layers)}


TINY_HF_CONV = hf_conv([(16, 10, 5), (16, 3, 2), (16, 3, 2), (16, 2, 2), (16, 2, 2)])
HF_COMMON: dict[str, Any] = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                 num_conv_pos_embedding_groups=4, hidden_dropout=0.0, attention_dropout=0.0,
                                 activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0, final_dropout=0.0)

# Two configs per architecture, differing where the architecture has variants.
HF_CONFIGS: dict[str, dict[str, Any]] = {
    # base: GroupNorm front end, post-LN, conv width != D, odd positional kernel, a mask embedding.
    "wav2vec2_base": dict(model_type="wav2vec2", **HF_COMMON, **TINY_HF_CONV, feat_extract_norm="group",
                          do_stable_layer_norm=False, num_conv_pos_embeddings=7, mask_time_prob=0.05),
    # large-lv60 / XLS-R: LayerNorm front end with conv bias, pre-LN ("stable"), conv width == D, even kernel, no
    # mask embedding, another LayerNorm epsilon.
    "wav2vec2_large": dict(model_type="wav2vec2", **HF_COMMON,
                           **hf_conv([(32, 10, 5), (32, 3, 2), (32, 3, 2), (32, 2, 2), (32, 2, 2)]),
                           feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
                           num_conv_pos_embeddings=8, mask_time_prob=0.0, layer_norm_eps=1e-6),
    "hubert_base": dict(model_type="hubert", **HF_COMMON, **TINY_HF_CONV, feat_extract_norm="group",
                        do_stable_layer_norm=False, num_conv_pos_embeddings=7),
    # mHuBERT-25Hz style: one more stride-2 conv (stride 160); pre-LN; no LayerNorm on the conv features.
    "hubert_large_25hz": dict(model_type="hubert", **HF_COMMON,
                              **hf_conv([(16, 10, 5), (16, 3, 2), (16, 3, 2), (16, 2, 2), (16, 2, 2), (16, 2, 2)]),
                              feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
                              num_conv_pos_embeddings=8, feat_proj_layer_norm=False),
    # data2vec-audio: its stack of layer-normed positional convs, odd and even kernels.
    "data2vec_a": dict(model_type="data2vec-audio", **HF_COMMON, **TINY_HF_CONV, num_conv_pos_embeddings=3,
                       conv_pos_kernel_size=5),
    "data2vec_b": dict(model_type="data2vec-audio", **HF_COMMON, **TINY_HF_CONV, num_conv_pos_embeddings=2,
                       conv_pos_kernel_size=4, conv_bias=True),
    # WavLM base (post-LN) and large (pre-LN): the gated relative position bias over few buckets, so that the
    # logarithmic buckets are reached at 24 frames.
    "wavlm_base": dict(model_type="wavlm", **HF_COMMON, **TINY_HF_CONV, feat_extract_norm="group",
                       do_stable_layer_norm=False, num_conv_pos_embeddings=7, num_buckets=16, max_bucket_distance=40),
    "wavlm_large": dict(model_type="wavlm", **HF_COMMON, **TINY_HF_CONV, feat_extract_norm="layer",
                        do_stable_layer_norm=True, conv_bias=True, num_conv_pos_embeddings=8, num_buckets=32,
                        max_bucket_distance=64),
}

HF_CLASSES = {
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model", "Wav2Vec2ForCTC", "Wav2Vec2ForSequenceClassification"),
    "hubert": ("HubertConfig", "HubertModel", "HubertForCTC", "HubertForSequenceClassification"),
    "data2vec-audio": ("Data2VecAudioConfig", "Data2VecAudioModel", "Data2VecAudioForCTC",
                       "Data2VecAudioForSequenceClassification"),
    "wavlm": ("WavLMConfig", "WavLMModel", "WavLMForCTC", "WavLMForSequenceClassification"),
}


def build_hf(name: str, head: str = "none", seed: int = 0, **overrides: Any) -> nn.Module:
    """A random tiny transformers model of ``HF_CONFIGS[name]``: ``head`` is ``none``, ``ctc``,
    ``classification`` or ``pretraining`` (wav2vec2 only)."""
    import transformers

    spec = dict(HF_CONFIGS[name])
    model_type = spec.pop("model_type")
    config_cls, bare, ctc, cls = (getattr(transformers, n) for n in HF_CLASSES[model_type])
    config = config_cls(**{**spec, **overrides})
    model_cls = {"none": bare, "ctc": ctc, "classification": cls,
                 "pretraining": getattr(transformers, "Wav2Vec2ForPreTraining", None)}[head]
    torch.manual_seed(seed)
    model = model_cls(config)
    randomize(model, seed + 11)
    return model.eval()


# Our names -> Hugging Face's for the tiny post-LN wav2vec2 (the key table read backwards, written out here so
# that the table is checked against an independent statement of it).
TO_HF = [
    (r"feature_extractor\.conv_layers\.(\d+)\.0\.", r"feature_extractor.conv_layers.\1.conv."),
    (r"feature_extractor\.conv_layers\.0\.2\.", "feature_extractor.conv_layers.0.layer_norm."),
    (r"^layer_norm\.", "feature_projection.layer_norm."),
    (r"^post_extract_proj\.", "feature_projection.projection."),
    (r"^mask_emb$", "masked_spec_embed"),
    (r"encoder\.pos_conv\.0\.weight_g", "encoder.pos_conv_embed.conv.parametrizations.weight.original0"),
    (r"encoder\.pos_conv\.0\.weight_v", "encoder.pos_conv_embed.conv.parametrizations.weight.original1"),
    (r"encoder\.pos_conv\.0\.bias", "encoder.pos_conv_embed.conv.bias"),
    (r"\.self_attn\.(q|k|v|out)_proj\.", r".attention.\1_proj."),
    (r"\.self_attn_layer_norm\.", ".layer_norm."),
    (r"\.fc1\.", ".feed_forward.intermediate_dense."),
    (r"\.fc2\.", ".feed_forward.output_dense."),
]
TINY_HF_CONFIG = {
    "model_type": "wav2vec2", "architectures": ["Wav2Vec2Model"], "hidden_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 4, "intermediate_size": 64, "conv_dim": [16] * 5, "conv_kernel": [10, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2], "feat_extract_norm": "group", "do_stable_layer_norm": False,
    "num_conv_pos_embeddings": 8, "num_conv_pos_embedding_groups": 4, "hidden_act": "gelu",
}


def to_hf_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, repl in TO_HF:
            key = re.sub(pattern, repl, key)
        out[key] = value.contiguous()
    return out


def write_hf_directory(model: nn.Module, directory: Path, preprocessor: dict | None = None) -> Path:
    """The tiny post-LN ``our_tiny("wav2vec2")`` as a Hugging Face directory written by hand (no transformers):
    ``config.json`` and ``model.safetensors`` under HF's names (and ``preprocessor_config.json`` if given)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
    save_file(to_hf_names(model.state_dict()), directory / "model.safetensors")
    if preprocessor is not None:
        (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return directory


CTC_VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "A": 5, "B": 6, "C": 7}


def save_hf(model: nn.Module, directory: Path, preprocessor: dict | None = None, vocab: dict | None = None,
            **kwargs: Any) -> Path:
    """``save_pretrained`` (``kwargs`` go to it) plus the files a processor would add (``preprocessor_config.json``,
    ``vocab.json``)."""
    model.save_pretrained(directory, **kwargs)
    if preprocessor is not None:
        (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    if vocab is not None:
        (directory / "vocab.json").write_text(json.dumps(vocab))
        (directory / "tokenizer_config.json").write_text(json.dumps({"word_delimiter_token": "|"}))
    return directory


def hf_hidden(model: nn.Module, source: torch.Tensor, padding: torch.Tensor | None) -> Any:
    """The transformers model's output with every hidden state (and the attention mask it wants)."""
    mask = None if padding is None else (~padding).long()
    with torch.no_grad():
        return model(source, attention_mask=mask, output_hidden_states=True)


# Ours -> Hugging Face's (transformers 4) names for AST, written out as the reverse of hf_keys.AST_KEYS.
AST_TO_HF = [
    (r"^cls_token$", "embeddings.cls_token"),
    (r"^dist_token$", "embeddings.distillation_token"),
    (r"^pos_embed$", "embeddings.position_embeddings"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.q_proj\.", r"encoder.layer.\1.attention.attention.query."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.k_proj\.", r"encoder.layer.\1.attention.attention.key."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.v_proj\.", r"encoder.layer.\1.attention.attention.value."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^encoder\.layers\.(\d+)\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^encoder\.layers\.(\d+)\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"encoder.layer.\1.layernorm_before."),
    (r"^encoder\.layers\.(\d+)\.final_layer_norm\.", r"encoder.layer.\1.layernorm_after."),
    (r"^encoder\.layer_norm\.", "layernorm."),
]


def write_hf_ast_directory(model: nn.Module, directory: Path) -> Path:
    """Our tiny AST (``our_tiny("ast")``) as a Hugging Face ``ASTModel`` directory written by hand (no
    transformers): ``config.json``, ``preprocessor_config.json`` and ``model.safetensors``."""
    from safetensors.torch import save_file

    cfg = model.cfg
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "audio-spectrogram-transformer", "architectures": ["ASTModel"],
              "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
              "num_attention_heads": cfg.num_attention_heads, "intermediate_size": cfg.intermediate_size,
              "hidden_act": cfg.hidden_act, "patch_size": cfg.patch_size, "frequency_stride": cfg.frequency_stride,
              "time_stride": cfg.time_stride, "max_length": cfg.max_length, "num_mel_bins": cfg.num_mel_bins,
              "layer_norm_eps": cfg.layer_norm_eps, "qkv_bias": True}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "preprocessor_config.json").write_text(json.dumps(
        {"max_length": cfg.max_length, "num_mel_bins": cfg.num_mel_bins, "sampling_rate": 16000, "mean": cfg.mean,
         "std": cfg.std, "do_normalize": cfg.do_normalize}))
    state = {}
    for key, value in model.state_dict().items():
        for pattern, repl in AST_TO_HF:
            key = re.sub(pattern, repl, key)
        state[key] = value.contiguous()
    save_file(state, directory / "model.safetensors")
    return directory
