"""Hugging Face encoder directories -> our models: ``config.json`` translated field by field, weights renamed by
explicit per-architecture key tables. transformers is never imported. (Over 400 lines on purpose: it is mostly
those tables, and one file is where a reader finds every key map.)

Supported (``model_type`` -> ``architectures``)::

    wav2vec2                         Wav2Vec2Model, Wav2Vec2ForCTC, Wav2Vec2ForSequenceClassification,
                                     Wav2Vec2ForPreTraining
    hubert                           HubertModel, HubertForCTC, HubertForSequenceClassification
    data2vec-audio                   Data2VecAudioModel, Data2VecAudioForCTC, Data2VecAudioForSequenceClassification
    wavlm                            WavLMModel, WavLMForCTC, WavLMForSequenceClassification
    audio-spectrogram-transformer    ASTModel, ASTForAudioClassification

A head model stores the encoder under a prefix (``wav2vec2.``, ``hubert.``, ``data2vec_audio.``, ``wavlm.``,
``audio_spectrogram_transformer.``) and its head beside it (``lm_head``; ``projector``, ``classifier``,
``layer_weights``; ``classifier.layernorm``/``classifier.dense``); a bare model has no prefix.

Key table of the wav2vec 2.0 family (HF name -> ours, ``i``/``j`` layer indices; ours are fairseq's)::

    feature_extractor.conv_layers.i.conv.*              feature_extractor.conv_layers.i.0.*
    feature_extractor.conv_layers.i.layer_norm.*        feature_extractor.conv_layers.i.2.*      ("group": i = 0)
                                                        feature_extractor.conv_layers.i.2.1.*    ("layer")
    feature_projection.layer_norm.*                     layer_norm.*
    feature_projection.projection.*                     post_extract_proj.*
    masked_spec_embed                                   mask_emb
    encoder.pos_conv_embed.conv.weight_g | .parametrizations.weight.original0   encoder.pos_conv.0.weight_g
    encoder.pos_conv_embed.conv.weight_v | .parametrizations.weight.original1   encoder.pos_conv.0.weight_v
    encoder.pos_conv_embed.conv.bias                    encoder.pos_conv.0.bias
    encoder.pos_conv_embed.layers.j.conv.*              encoder.pos_conv.j.0.*                   (data2vec-audio)
    encoder.layer_norm.*                                encoder.layer_norm.*
    encoder.layers.i.attention.{q,k,v,out}_proj.*       encoder.layers.i.self_attn.{q,k,v,out}_proj.*
    encoder.layers.i.attention.gru_rel_pos_linear.*     encoder.layers.i.self_attn.grep_linear.*   (WavLM)
    encoder.layers.i.attention.gru_rel_pos_const        encoder.layers.i.self_attn.grep_a          (WavLM)
    encoder.layers.i.attention.rel_attn_embed.weight    encoder.layers.i.self_attn.relative_attention_bias.weight
    encoder.layers.i.layer_norm.*                       encoder.layers.i.self_attn_layer_norm.*
    encoder.layers.i.feed_forward.intermediate_dense.*  encoder.layers.i.fc1.*
    encoder.layers.i.feed_forward.output_dense.*        encoder.layers.i.fc2.*
    encoder.layers.i.final_layer_norm.*                 encoder.layers.i.final_layer_norm.*

``Wav2Vec2ForPreTraining``'s ``quantizer.*``, ``project_q.*`` and ``project_hid.*`` are kept as frozen buffers
under those names (:meth:`~speechprompt.models.wav2vec2.Wav2Vec2Model.keep_pretraining_tensors`).

Key table of AST (transformers 4 names | transformers 5 names -> ours)::

    embeddings.cls_token | same                          cls_token
    embeddings.distillation_token | same                 dist_token
    embeddings.position_embeddings | same                pos_embed
    embeddings.patch_embeddings.projection.* | same      patch_embed.proj.*
    encoder.layer.i.attention.attention.{query,key,value}.* | layers.i.attention.{q,k,v}_proj.*
                                                         encoder.layers.i.self_attn.{q,k,v}_proj.*
    encoder.layer.i.attention.output.dense.* | layers.i.attention.o_proj.*   encoder.layers.i.self_attn.out_proj.*
    encoder.layer.i.intermediate.dense.* | layers.i.mlp.fc1.*                encoder.layers.i.fc1.*
    encoder.layer.i.output.dense.* | layers.i.mlp.fc2.*                      encoder.layers.i.fc2.*
    encoder.layer.i.layernorm_before.* | layers.i.layernorm_before.*         encoder.layers.i.self_attn_layer_norm.*
    encoder.layer.i.layernorm_after.* | layers.i.layernorm_after.*           encoder.layers.i.final_layer_norm.*
    layernorm.*                                          encoder.layer_norm.*

Normalisation of the waveform follows ``preprocessor_config.json`` (``do_normalize``, with HF's epsilon 1e-7); a
directory without one gets none. AST's fbank statistics and length come from the same file when it is there.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from speechprompt.config import ConfigError
from speechprompt.errors import CheckpointError
from speechprompt.hf_compat import read_config, read_optional_json, read_weights
from speechprompt.models.ast import ASTConfig, ASTModel
from speechprompt.models.heads import ASTClassifier, CTCOutput, SequenceClassifier
from speechprompt.models.hubert import HubertConfig, HubertModel
from speechprompt.models.wav2vec2 import (
    ExtractorMode,
    FramePadding,
    Wav2Vec2Config,
    Wav2Vec2Model,
    conv_layers_spec,
)
from speechprompt.models.weights import load_exact

# model_type -> (our architecture name, the prefix a head model stores the encoder under, {architecture: head kind})
MODEL_TYPES: dict[str, tuple[str, str, dict[str, str]]] = {
    "wav2vec2": ("wav2vec2", "wav2vec2.", {"Wav2Vec2Model": "none", "Wav2Vec2ForCTC": "ctc",
                                           "Wav2Vec2ForSequenceClassification": "classification",
                                           "Wav2Vec2ForPreTraining": "pretraining"}),
    "hubert": ("hubert", "hubert.", {"HubertModel": "none", "HubertForCTC": "ctc",
                                     "HubertForSequenceClassification": "classification"}),
    "data2vec-audio": ("data2vec_audio", "data2vec_audio.", {
        "Data2VecAudioModel": "none", "Data2VecAudioForCTC": "ctc",
        "Data2VecAudioForSequenceClassification": "classification"}),
    "wavlm": ("wavlm", "wavlm.", {"WavLMModel": "none", "WavLMForCTC": "ctc",
                                  "WavLMForSequenceClassification": "classification"}),
    "audio-spectrogram-transformer": ("ast", "audio_spectrogram_transformer.", {
        "ASTModel": "none", "ASTForAudioClassification": "classification"}),
}

_L = r"(\d+)"
_WB = r"(weight|bias)"

# The wav2vec 2.0 family's table (see the module docstring); the conv norms depend on the extractor mode.
WAV2VEC2_KEYS: list[tuple[str, str]] = [
    (rf"feature_extractor\.conv_layers\.{_L}\.conv\.{_WB}", r"feature_extractor.conv_layers.\1.0.\2"),
    (r"feature_projection\.layer_norm\." + _WB, r"layer_norm.\1"),
    (r"feature_projection\.projection\." + _WB, r"post_extract_proj.\1"),
    (r"masked_spec_embed", "mask_emb"),
    (r"encoder\.pos_conv_embed\.conv\.(?:weight_g|parametrizations\.weight\.original0)", "encoder.pos_conv.0.weight_g"),
    (r"encoder\.pos_conv_embed\.conv\.(?:weight_v|parametrizations\.weight\.original1)", "encoder.pos_conv.0.weight_v"),
    (r"encoder\.pos_conv_embed\.conv\.bias", "encoder.pos_conv.0.bias"),
    (rf"encoder\.pos_conv_embed\.layers\.{_L}\.conv\.{_WB}", r"encoder.pos_conv.\1.0.\2"),
    (r"encoder\.layer_norm\." + _WB, r"encoder.layer_norm.\1"),
    (rf"encoder\.layers\.{_L}\.attention\.(q|k|v|out)_proj\.{_WB}", r"encoder.layers.\1.self_attn.\2_proj.\3"),
    (rf"encoder\.layers\.{_L}\.attention\.gru_rel_pos_linear\.{_WB}", r"encoder.layers.\1.self_attn.grep_linear.\2"),
    (rf"encoder\.layers\.{_L}\.attention\.gru_rel_pos_const", r"encoder.layers.\1.self_attn.grep_a"),
    (rf"encoder\.layers\.{_L}\.attention\.rel_attn_embed\.weight",
     r"encoder.layers.\1.self_attn.relative_attention_bias.weight"),
    (rf"encoder\.layers\.{_L}\.layer_norm\.{_WB}", r"encoder.layers.\1.self_attn_layer_norm.\2"),
    (rf"encoder\.layers\.{_L}\.feed_forward\.intermediate_dense\.{_WB}", r"encoder.layers.\1.fc1.\2"),
    (rf"encoder\.layers\.{_L}\.feed_forward\.output_dense\.{_WB}", r"encoder.layers.\1.fc2.\2"),
    (rf"encoder\.layers\.{_L}\.final_layer_norm\.{_WB}", r"encoder.layers.\1.final_layer_norm.\2"),
]
CONV_NORM_KEYS: dict[ExtractorMode, tuple[str, str]] = {
    ExtractorMode.DEFAULT: (rf"feature_extractor\.conv_layers\.{_L}\.layer_norm\.{_WB}",
                            r"feature_extractor.conv_layers.\1.2.\2"),
    ExtractorMode.LAYER_NORM: (rf"feature_extractor\.conv_layers\.{_L}\.layer_norm\.{_WB}",
                               r"feature_extractor.conv_layers.\1.2.1.\2"),
}
WAV2VEC2_PRETRAINING_ROOTS = ("quantizer", "project_q", "project_hid")

_LAYER4 = rf"encoder\.layer\.{_L}\."  # transformers 4
_LAYER5 = rf"layers\.{_L}\."  # transformers 5
AST_KEYS: list[tuple[str, str]] = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.distillation_token", "dist_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\." + _WB, r"patch_embed.proj.\1"),
    (_LAYER4 + r"attention\.attention\.query\." + _WB, r"encoder.layers.\1.self_attn.q_proj.\2"),
    (_LAYER4 + r"attention\.attention\.key\." + _WB, r"encoder.layers.\1.self_attn.k_proj.\2"),
    (_LAYER4 + r"attention\.attention\.value\." + _WB, r"encoder.layers.\1.self_attn.v_proj.\2"),
    (_LAYER4 + r"attention\.output\.dense\." + _WB, r"encoder.layers.\1.self_attn.out_proj.\2"),
    (_LAYER4 + r"intermediate\.dense\." + _WB, r"encoder.layers.\1.fc1.\2"),
    (_LAYER4 + r"output\.dense\." + _WB, r"encoder.layers.\1.fc2.\2"),
    (_LAYER4 + r"layernorm_before\." + _WB, r"encoder.layers.\1.self_attn_layer_norm.\2"),
    (_LAYER4 + r"layernorm_after\." + _WB, r"encoder.layers.\1.final_layer_norm.\2"),
    (_LAYER5 + r"attention\.(q|k|v)_proj\." + _WB, r"encoder.layers.\1.self_attn.\2_proj.\3"),
    (_LAYER5 + r"attention\.o_proj\." + _WB, r"encoder.layers.\1.self_attn.out_proj.\2"),
    (_LAYER5 + r"mlp\.fc1\." + _WB, r"encoder.layers.\1.fc1.\2"),
    (_LAYER5 + r"mlp\.fc2\." + _WB, r"encoder.layers.\1.fc2.\2"),
    (_LAYER5 + r"layernorm_before\." + _WB, r"encoder.layers.\1.self_attn_layer_norm.\2"),
    (_LAYER5 + r"layernorm_after\." + _WB, r"encoder.layers.\1.final_layer_norm.\2"),
    (r"layernorm\." + _WB, r"encoder.layer_norm.\1"),
]

_ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "gelu_new": "gelu_accurate", "gelu_pytorch_tanh": "gelu_accurate"}


def rename(state: Mapping[str, Tensor], table: list[tuple[str, str]]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename every key that fully matches a pattern of ``table``. Returns the renamed tensors and the keys that
    matched nothing (the caller decides whether they are a head or an error)."""
    compiled = [(re.compile(pattern), repl) for pattern, repl in table]
    out: dict[str, Tensor] = {}
    unmatched = []
    for key, value in state.items():
        for pattern, repl in compiled:
            if pattern.fullmatch(key):
                out[pattern.sub(repl, key)] = value
                break
        else:
            unmatched.append(key)
    return out, unmatched


# --------------------------------------------------------------------------------------------------------------
# config.json


class _Fields:
    """Typed, strict access to ``config.json`` fields: a present field of the wrong type is an error."""

    def __init__(self, cfg: Mapping[str, Any], path: Path) -> None:
        self.cfg, self.path = cfg, path

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        value = self.cfg.get(key, default)
        if value is None:
            if default is None:
                raise CheckpointError(f"{self.path}: config field {key!r} is missing")
            return default
        ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in _tuple(kind))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)
        if not ok:
            raise CheckpointError(f"{self.path}: config field {key!r} is {value!r}, expected {_names(kind)}")
        return value

    def ints(self, key: str) -> list[int]:
        value = self.get(key, (list, tuple))
        if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
            raise CheckpointError(f"{self.path}: config field {key!r} must be a list of positive integers")
        return list(value)

    def refuse(self, key: str, allowed: Any, why: str) -> None:
        value = self.cfg.get(key)
        if value is not None and value != allowed:
            raise CheckpointError(f"{self.path}: {key}={value!r} ({why}) is not supported")

    def activation(self, key: str) -> str:
        name = self.get(key, str, "gelu")
        if name not in _ACTIVATIONS:
            raise CheckpointError(f"{self.path}: {key}={name!r} is not supported (supported: "
                                  f"{', '.join(sorted(_ACTIVATIONS))})")
        return _ACTIVATIONS[name]


def _tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _names(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _tuple(kind))


def wav2vec2_config(cfg: Mapping[str, Any], model_type: str, path: Path) -> Wav2Vec2Config:
    """Our config from a wav2vec 2.0-family ``config.json`` (``path`` names the file in errors)."""
    f = _Fields(cfg, path)
    dims, kernels, strides = f.ints("conv_dim"), f.ints("conv_kernel"), f.ints("conv_stride")
    if not len(dims) == len(kernels) == len(strides):
        raise CheckpointError(f"{path}: conv_dim, conv_kernel and conv_stride have different lengths "
                              f"({len(dims)}, {len(kernels)}, {len(strides)})")
    # data2vec-audio has no choice: a LayerNorm after every conv.
    norm = "layer" if model_type == "data2vec-audio" else f.get("feat_extract_norm", str, "group")
    if norm not in ("group", "layer"):
        raise CheckpointError(f"{path}: feat_extract_norm={norm!r} is not supported (supported: group, layer)")
    if f.activation("feat_extract_activation") != "gelu":
        raise CheckpointError(f"{path}: feat_extract_activation must be gelu")
    f.refuse("add_adapter", False, "an adapter stack after the encoder")
    f.refuse("adapter_attn_dim", None, "per-language attention adapters")
    f.refuse("conv_pos_batch_norm", False, "a batch-normed positional conv")
    f.refuse("position_embeddings_type", None, "conformer position embeddings")
    values: dict[str, Any] = {
        "extractor_mode": ExtractorMode.LAYER_NORM if norm == "layer" else ExtractorMode.DEFAULT,
        "conv_feature_layers": conv_layers_spec(list(zip(dims, kernels, strides))),
        "conv_bias": f.get("conv_bias", bool, False),
        "encoder_layers": f.get("num_hidden_layers", int),
        "encoder_embed_dim": f.get("hidden_size", int),
        "encoder_ffn_embed_dim": f.get("intermediate_size", int),
        "encoder_attention_heads": f.get("num_attention_heads", int),
        "activation_fn": f.activation("hidden_act"),
        "layer_norm_first": f.get("do_stable_layer_norm", bool, False),
        "conv_pos_groups": f.get("num_conv_pos_embedding_groups", int, 16),
        "dropout": f.get("hidden_dropout", float, 0.1),
        "attention_dropout": f.get("attention_dropout", float, 0.1),
        "activation_dropout": f.get("activation_dropout", float, 0.1),
        "dropout_input": f.get("feat_proj_dropout", float, 0.0),
        "layer_norm_eps": f.get("layer_norm_eps", float, 1e-5),
        "frame_padding": FramePadding.LENGTHS.value,
        "always_project": True,
        "feature_layer_norm": f.get("feat_proj_layer_norm", bool, True) if model_type == "hubert" else True,
    }
    if model_type == "data2vec-audio":
        # HF counts the convs in num_conv_pos_embeddings and gives each kernel; fairseq gives the total kernel.
        depth, kernel = f.get("num_conv_pos_embeddings", int, 5), f.get("conv_pos_kernel_size", int, 19)
        if kernel < 3:
            raise CheckpointError(f"{path}: conv_pos_kernel_size={kernel} is not supported (at least 3)")
        values.update(pos_conv_depth=depth, conv_pos=kernel * depth, layer_norm_first=False)
    else:
        values["conv_pos"] = f.get("num_conv_pos_embeddings", int, 128)
    if model_type == "wavlm":
        values.update(relative_position_embedding=True, num_buckets=f.get("num_buckets", int, 320),
                      max_distance=f.get("max_bucket_distance", int, 800), gru_rel_pos=True)
    cls = HubertConfig if model_type == "hubert" else Wav2Vec2Config
    try:
        return cls(**values)
    except (ConfigError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def ast_config(cfg: Mapping[str, Any], preprocessor: Mapping[str, Any] | None, path: Path) -> ASTConfig:
    """Our AST config from ``config.json`` and, when present, ``preprocessor_config.json``."""
    f = _Fields(cfg, path)
    f.refuse("qkv_bias", True, "attention projections without biases")
    patch = f.get("patch_size", (int, list), 16)
    if isinstance(patch, list):
        if len(patch) != 2 or patch[0] != patch[1]:
            raise CheckpointError(f"{path}: patch_size={patch!r} is not supported (square patches only)")
        patch = patch[0]
    values: dict[str, Any] = {
        "hidden_size": f.get("hidden_size", int), "num_hidden_layers": f.get("num_hidden_layers", int),
        "num_attention_heads": f.get("num_attention_heads", int),
        "intermediate_size": f.get("intermediate_size", int), "hidden_act": f.activation("hidden_act"),
        "hidden_dropout_prob": f.get("hidden_dropout_prob", float, 0.0),
        "attention_probs_dropout_prob": f.get("attention_probs_dropout_prob", float, 0.0),
        "layer_norm_eps": f.get("layer_norm_eps", float, 1e-12), "patch_size": patch,
        "frequency_stride": f.get("frequency_stride", int, 10), "time_stride": f.get("time_stride", int, 10),
        "max_length": f.get("max_length", int, 1024), "num_mel_bins": f.get("num_mel_bins", int, 128),
    }
    if preprocessor is not None:
        p = _Fields(preprocessor, path.parent / "preprocessor_config.json")
        for key in ("max_length", "num_mel_bins"):
            if p.get(key, int, values[key]) != values[key]:
                raise CheckpointError(f"{p.path}: {key}={preprocessor[key]} differs from the model's "
                                      f"{values[key]} in {path.name}")
        if p.get("sampling_rate", int, 16000) != 16000:
            raise CheckpointError(f"{p.path}: sampling_rate={preprocessor['sampling_rate']} (only 16000)")
        values.update(mean=p.get("mean", float, -4.2677393), std=p.get("std", float, 4.5689974),
                      do_normalize=p.get("do_normalize", bool, True))
    try:
        return ASTConfig(**values)
    except (ConfigError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _labels(cfg: Mapping[str, Any], n: int, path: Path) -> list[str]:
    """Class names from ``id2label`` (``LABEL_i`` when absent), checked against the head's size."""
    id2label = cfg.get("id2label") or {}
    if not isinstance(id2label, dict):
        raise CheckpointError(f"{path}: id2label must be an object")
    labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n)]
    if id2label and len(id2label) != n:
        raise CheckpointError(f"{path}: id2label has {len(id2label)} labels, the classifier {n} outputs")
    return labels


def _ctc_vocab(directory: Path, cfg: Mapping[str, Any], size: int) -> tuple[list[str], int, str | None]:
    """The CTC symbols by index from ``vocab.json`` (``<i>`` placeholders without one), the blank and delimiter."""
    f = _Fields(cfg, directory / "config.json")
    blank = f.get("pad_token_id", int, 0)
    vocab = [f"<{i}>" for i in range(size)]
    tokens = read_optional_json(directory, "vocab.json")
    tok_cfg = read_optional_json(directory, "tokenizer_config.json") or {}
    delimiter = tok_cfg.get("word_delimiter_token", "|")
    if tokens is not None:
        if tokens and all(isinstance(v, dict) for v in tokens.values()):  # multilingual: {lang: {token: id}}
            lang = tok_cfg.get("target_lang")
            if lang not in tokens:
                raise CheckpointError(f"{directory / 'vocab.json'}: one vocabulary per language and no known "
                                      f"target_lang in tokenizer_config.json")
            tokens = tokens[lang]
        for token, idx in tokens.items():
            if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
                raise CheckpointError(f"{directory / 'vocab.json'}: token {token!r} has id {idx!r}, not an index")
            if idx < size:  # tokens past the CTC outputs (added specials) can never be emitted
                vocab[idx] = token
    if not 0 <= blank < size:
        raise CheckpointError(f"{directory / 'config.json'}: pad_token_id {blank} (the CTC blank) is outside the "
                              f"{size} outputs")
    return vocab, blank, delimiter if isinstance(delimiter, str) else None


def _split_prefix(state: dict[str, Tensor], prefix: str) -> tuple[dict[str, Tensor], dict[str, Tensor], str]:
    """(encoder tensors without the prefix, everything else, the prefix found). A bare model saved without a
    prefix keeps all its tensors, and the prefix found is empty."""
    inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not inner:
        return dict(state), {}, ""
    return inner, {k: v for k, v in state.items() if not k.startswith(prefix)}, prefix


def load_hf_encoder(directory: str | Path) -> tuple[nn.Module, nn.Module | None, dict[str, Any], Path]:
    """Build and load the encoder (and head) of a Hugging Face directory.

    Returns:
        ``(encoder, head or None, task_cfg, weights file)``; the encoder is in eval mode.

    Raises:
        CheckpointError: an unsupported ``model_type``/architecture, bad config fields, unreadable weights, or
            weights that do not match the config (one line, naming the file).
    """
    directory = Path(directory)
    cfg = read_config(directory)
    config_path = directory / "config.json"
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{config_path}: model_type {model_type!r} is not a supported encoder (supported: "
                              f"{', '.join(MODEL_TYPES)})")
    architecture, prefix, heads = MODEL_TYPES[model_type]
    names = cfg.get("architectures") or []
    if not isinstance(names, list) or len(names) > 1 or (names and names[0] not in heads):
        raise CheckpointError(f"{config_path}: architectures {names!r} is not supported for {model_type} "
                              f"(supported: {', '.join(heads)})")
    preprocessor = read_optional_json(directory, "preprocessor_config.json")
    state, weights_path = read_weights(directory)
    encoder_state, rest, found_prefix = _split_prefix(state, prefix)
    # Without "architectures", the head is what the weights hold.
    kind = heads[names[0]] if names else ("ctc" if "lm_head.weight" in rest else
                                          "classification" if any(k.startswith("classifier.") for k in rest) else
                                          "pretraining" if rest else "none")

    if architecture == "ast":
        model: nn.Module = ASTModel(ast_config(cfg, preprocessor, config_path))
        mapped, unmatched = rename(encoder_state, AST_KEYS)
        task_cfg: dict[str, Any] = {"normalize": False, "sample_rate": 16000}
    else:
        w2v_cfg = wav2vec2_config(cfg, model_type, config_path)
        table = WAV2VEC2_KEYS + [CONV_NORM_KEYS[w2v_cfg.extractor_mode]]
        mapped, unmatched = rename(encoder_state, table)
        w2v_cfg.has_mask_emb = "mask_emb" in mapped  # HF builds it only when masking is configured
        if isinstance(w2v_cfg, HubertConfig):
            model = HubertModel(w2v_cfg, pretraining_heads=False)
        else:
            model = Wav2Vec2Model(w2v_cfg, architecture)
        if kind == "pretraining":
            pretraining = {k: v for k, v in rest.items() if k.split(".")[0] in WAV2VEC2_PRETRAINING_ROOTS}
            model.keep_pretraining_tensors(pretraining)
            mapped.update(pretraining)
            rest = {k: v for k, v in rest.items() if k not in pretraining}
        normalize = bool(preprocessor.get("do_normalize", False)) if preprocessor else False
        task_cfg = {"normalize": normalize, "normalize_eps": 1e-7, "sample_rate": 16000}
    if unmatched:
        shown = ", ".join(found_prefix + k for k in unmatched[:6])
        raise CheckpointError(f"{weights_path}: tensors that a {model_type} encoder does not have: {shown}"
                              + (f" (+{len(unmatched) - 6} more)" if len(unmatched) > 6 else ""))
    load_exact(model, mapped, weights_path, f"the {model_type} architecture {config_path.name} describes")

    head = _build_head(kind, cfg, rest, model, directory, weights_path)
    return model.eval(), head, task_cfg, weights_path


def _build_head(kind: str, cfg: Mapping[str, Any], rest: dict[str, Tensor], model: nn.Module, directory: Path,
                weights_path: Path) -> nn.Module | None:
    D = model.encoder_embed_dim
    head: nn.Module | None = None
    if kind == "ctc":
        if "lm_head.weight" not in rest:
            raise CheckpointError(f"{weights_path}: a CTC model without lm_head weights")
        vocab, blank, delimiter = _ctc_vocab(directory, cfg, rest["lm_head.weight"].shape[0])
        head = CTCOutput(D, vocab, blank, delimiter)
        state = {k.replace("lm_head.", "proj.", 1): v for k, v in rest.items()}
    elif kind == "classification" and isinstance(model, ASTModel):
        n = rest["classifier.dense.weight"].shape[0] if "classifier.dense.weight" in rest else 0
        head = ASTClassifier(D, _labels(cfg, n, directory / "config.json"), model.cfg.layer_norm_eps)
        state = {k[len("classifier."):]: v for k, v in rest.items()}
    elif kind == "classification":
        if "projector.weight" not in rest or "classifier.weight" not in rest:
            raise CheckpointError(f"{weights_path}: a sequence classifier without projector/classifier weights")
        weighted = model.num_layers + 1 if "layer_weights" in rest else None
        head = SequenceClassifier(D, rest["projector.weight"].shape[0],
                                  _labels(cfg, rest["classifier.weight"].shape[0], directory / "config.json"),
                                  weighted)
        state = dict(rest)
    elif rest:
        raise CheckpointError(f"{weights_path}: tensors outside the encoder that a bare model does not have: "
                              + ", ".join(sorted(rest)[:6]))
    else:
        return None
    load_exact(head, state, weights_path, f"the {kind} head {directory.name}/config.json describes")
    return head.eval()
