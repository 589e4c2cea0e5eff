"""Loading speech LMs: fairseq unit LMs, Hugging Face causal-LM directories and slamkit (TWIST/SLAM) directories.

:func:`load_speech_lm` is the one entry point; it returns the model and its :class:`~speechprompt.models.
unit_vocab.UnitVocab`. transformers is never imported: ``config.json`` is translated field by field and the weights
are renamed by the key table below.

Recognised layouts:

* a file: a fairseq unit-LM checkpoint with its ``dict.txt`` beside it (GSLM's vocabulary);
* a directory whose ``config.json`` has ``model_type: speech_language_model`` (slamkit, as TWIST and SLAM are
  published): the decoder's own config under ``base_config``, weights under the prefix ``lm.``, ``pad`` 0,
  ``bos = eos`` 1, unit ``u`` = token ``u + max(pad, bos, eos) + 1``; a ``tokeniser_config.json`` beside it may
  say ``num_units``, ``bos_eos_token_id``, ``pad_token_id`` (and ``dedup``, which the units must then follow);
* a directory with ``model_type`` ``opt``, ``llama`` or ``qwen2`` (``...ForCausalLM`` or the bare model): the unit
  mapping is read from ``unit_vocab.json`` beside it (``{"unit_offset", "num_units", "bos", "eos", "pad"}``), or
  from the tokenizer's unit tokens ``<Un{u}>`` (``tokenizer.json`` or ``vocab.json``) with bos/eos/pad from
  ``config.json``; when neither says it, loading stops with one line.

Key table (HF name -> ours; ``i`` a layer; LLaMA and Qwen2 under ``model.``, OPT under ``model.decoder.``, and
slamkit puts ``lm.`` in front of either)::

    model.embed_tokens.weight                          decoder.embed_tokens.weight
    model.layers.i.self_attn.{q,k,v}_proj.*            decoder.layers.i.self_attn.{q,k,v}_proj.*
    model.layers.i.self_attn.o_proj.*                  decoder.layers.i.self_attn.out_proj.*
    model.layers.i.mlp.{gate,up,down}_proj.*           decoder.layers.i.mlp.{gate,up,down}_proj.*
    model.layers.i.input_layernorm.weight              decoder.layers.i.self_attn_layer_norm.weight
    model.layers.i.post_attention_layernorm.weight     decoder.layers.i.final_layer_norm.weight
    model.norm.weight                                  decoder.layer_norm.weight
    model.decoder.embed_tokens.weight                  decoder.embed_tokens.weight                 (OPT)
    model.decoder.embed_positions.weight               decoder.embed_positions.weight  (OPT: row p + 2 is position p)
    model.decoder.project_in.weight / project_out      decoder.project_in.weight / project_out     (OPT)
    model.decoder.final_layer_norm.*                   decoder.layer_norm.*                        (OPT)
    model.decoder.layers.i.{self_attn.*, self_attn_layer_norm.*, fc1.*, fc2.*, final_layer_norm.*}   same names
    lm_head.weight                                     decoder.output_projection.weight

Rotary ``inv_freq`` buffers that older checkpoints carry are dropped (they are recomputed from the config).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from speechprompt.config import ConfigError
from speechprompt.errors import CheckpointError
from speechprompt.hf_compat import read_config, read_optional_json, read_weights
from speechprompt.models.hf_keys import rename
from speechprompt.models.speech_lm import SpeechLM, SpeechLMConfig
from speechprompt.models.unit_lm import UnitLM, load_state_strict, load_unit_lm
from speechprompt.models.unit_vocab import UnitVocab, UnitVocabError

SLAMKIT_TYPE = "speech_language_model"
UNIT_VOCAB_FILE = "unit_vocab.json"
_WB = r"(weight|bias)"
_ROTARY = re.compile(r"(.*\.)?rotary_emb\.inv_freq$")

_LLAMA_KEYS: list[tuple[str, str]] = [
    (r"model\.embed_tokens\.weight", r"decoder.embed_tokens.weight"),
    (rf"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.{_WB}", r"decoder.layers.\1.self_attn.\2_proj.\3"),
    (rf"model\.layers\.(\d+)\.self_attn\.o_proj\.{_WB}", r"decoder.layers.\1.self_attn.out_proj.\2"),
    (rf"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.{_WB}", r"decoder.layers.\1.mlp.\2_proj.\3"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"decoder.layers.\1.self_attn_layer_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"decoder.layers.\1.final_layer_norm.weight"),
    (r"model\.norm\.weight", r"decoder.layer_norm.weight"),
    (r"lm_head\.weight", r"decoder.output_projection.weight"),
]
_OPT_KEYS: list[tuple[str, str]] = [
    (r"(?:model\.)?decoder\.(embed_tokens|embed_positions|project_in|project_out)\.weight", r"decoder.\1.weight"),
    (rf"(?:model\.)?decoder\.final_layer_norm\.{_WB}", r"decoder.layer_norm.\1"),
    (rf"(?:model\.)?decoder\.layers\.(\d+)\.(self_attn\.[qkv]_proj|self_attn\.out_proj|self_attn_layer_norm|fc1|fc2"
     rf"|final_layer_norm)\.{_WB}", r"decoder.layers.\1.\2.\3"),
    (r"lm_head\.weight", r"decoder.output_projection.weight"),
]
KEY_TABLES = {"opt": _OPT_KEYS, "llama": _LLAMA_KEYS, "qwen2": _LLAMA_KEYS}


# --------------------------------------------------------------------------------------------------------------
# config.json


def _get(cfg: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: Path, default: Any = None) -> Any:
    value = cfg.get(key, default)
    if value is None:
        if default is None:
            raise CheckpointError(f"{where}: config field {key!r} is missing")
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise CheckpointError(f"{where}: config field {key!r} is {value!r}, expected {kind}")
    return value


def decoder_config(cfg: Mapping[str, Any], where: Path, padding_idx: int) -> SpeechLMConfig:
    """Our :class:`SpeechLMConfig` from an OPT, LLaMA or Qwen2 ``config.json`` (``where`` names it in errors)."""
    family = cfg.get("model_type")
    if family not in KEY_TABLES:
        raise CheckpointError(f"{where}: model_type {family!r} is not a supported decoder (supported: "
                              f"{', '.join(KEY_TABLES)}, and slamkit's {SLAMKIT_TYPE})")
    g = lambda key, kind, default=None: _get(cfg, key, kind, where, default)  # noqa: E731
    d, heads = g("hidden_size", int), g("num_attention_heads", int)
    common = dict(family=family, vocab_size=g("vocab_size", int), embed_dim=d, layers=g("num_hidden_layers", int),
                  heads=heads, tie_embeddings=g("tie_word_embeddings", bool, True), padding_idx=padding_idx,
                  max_positions=g("max_position_embeddings", int, 2048))
    try:
        if family == "opt":
            pre = g("do_layer_norm_before", bool, True)
            if not g("layer_norm_elementwise_affine", bool, True):
                raise CheckpointError(f"{where}: layer_norm_elementwise_affine=false is not supported")
            act = g("activation_function", str, "relu")
            bias = g("enable_bias", bool, True)
            wdim = g("word_embed_proj_dim", int, d)
            return SpeechLMConfig(
                **common, ffn_dim=g("ffn_dim", int), kv_heads=heads, head_dim=d // heads, normalize_before=pre,
                final_layer_norm=pre and not g("_remove_final_layer_norm", bool, False), norm="layer", norm_eps=1e-5,
                ffn="mlp", activation={"gelu_new": "gelu_accurate"}.get(act, act), qkv_bias=bias, out_bias=bias,
                ffn_bias=bias, learned_pos=True, word_embed_dim=wdim if wdim != d else 0,
                dropout=g("dropout", float, 0.0), attention_dropout=g("attention_dropout", float, 0.0),
                activation_dropout=g("activation_dropout", float, 0.0))
        if family == "qwen2" and g("use_sliding_window", bool, False):
            raise CheckpointError(f"{where}: use_sliding_window=true (Qwen2 sliding-window attention) is not "
                                  "supported")
        rope = cfg.get("rope_scaling") or {}
        params = cfg.get("rope_parameters")  # transformers 5 keeps theta and scaling together here
        if isinstance(params, Mapping):
            rope = rope or {k: v for k, v in params.items() if k != "rope_theta"}
        theta = g("rope_theta", float, float(params.get("rope_theta", 10000.0)) if isinstance(params, Mapping)
                  else 10000.0)
        if rope.get("rope_type", rope.get("type")) == "default":
            rope = {}
        llama_bias = g("attention_bias", bool, False)
        act = g("hidden_act", str, "silu")
        if act != "silu":
            raise CheckpointError(f"{where}: hidden_act={act!r} is not supported (silu)")
        return SpeechLMConfig(
            **common, ffn_dim=g("intermediate_size", int), kv_heads=g("num_key_value_heads", int, heads),
            head_dim=g("head_dim", int, d // heads), normalize_before=True, final_layer_norm=True, norm="rms",
            norm_eps=g("rms_norm_eps", float, 1e-6), ffn="swiglu", activation="silu",
            qkv_bias=True if family == "qwen2" else llama_bias, out_bias=False if family == "qwen2" else llama_bias,
            ffn_bias=g("mlp_bias", bool, False), rope_theta=theta, rope_scaling=dict(rope),
            attention_dropout=g("attention_dropout", float, 0.0))
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


# --------------------------------------------------------------------------------------------------------------
# unit vocabularies


def _slamkit_vocab(directory: Path, cfg: Mapping[str, Any], size: int) -> UnitVocab:
    """slamkit's layout: its tokeniser's ``tokeniser_config.json`` when present, else the special ids slamkit gives
    the decoder's config (``base_config``; its own defaults pad 0, bos = eos 1)."""
    tok = read_optional_json(directory, "tokeniser_config.json") or {}
    base = cfg.get("base_config") or {}

    def special(key: str, default: int) -> int:
        value = cfg.get(key, base.get(key))
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else default

    pad = int(tok.get("pad_token_id", special("pad_token_id", 0)))
    bos = int(tok.get("bos_eos_token_id", special("bos_token_id", 1)))
    eos = int(tok.get("bos_eos_token_id", special("eos_token_id", bos)))
    offset = max(pad, bos, eos) + 1
    num_units = int(tok.get("num_units", size - offset))
    try:
        return UnitVocab(size=size, num_units=num_units, unit_offset=offset, bos=bos, eos=eos, pad=pad,
                         layout="slamkit")
    except UnitVocabError as e:
        raise CheckpointError(f"{directory}: {e}") from None


_UNIT_TOKEN = re.compile(r"<Un(\d+)>")


def _tokenizer_units(directory: Path) -> dict[int, int]:
    """``unit -> token id`` from the unit tokens ``<Un{u}>`` of ``tokenizer.json`` or ``vocab.json`` (empty if
    neither lists any)."""
    found: dict[int, int] = {}
    tok = read_optional_json(directory, "tokenizer.json")
    entries: list[tuple[str, int]] = []
    if tok is not None:
        model_vocab = (tok.get("model") or {}).get("vocab")
        if isinstance(model_vocab, Mapping):
            entries += [(k, v) for k, v in model_vocab.items() if isinstance(v, int)]
        entries += [(t.get("content", ""), t.get("id")) for t in tok.get("added_tokens") or []
                    if isinstance(t, Mapping) and isinstance(t.get("id"), int)]
    vocab = read_optional_json(directory, "vocab.json")
    if vocab is not None:
        entries += [(k, v) for k, v in vocab.items() if isinstance(v, int)]
    for text, token_id in entries:
        m = _UNIT_TOKEN.fullmatch(text)
        if m:
            found[int(m[1])] = token_id
    return found


def _hf_vocab(directory: Path, cfg: Mapping[str, Any], size: int) -> UnitVocab:
    given = read_optional_json(directory, UNIT_VOCAB_FILE)
    try:
        if given is not None:
            return UnitVocab.from_dict({"size": size, "layout": "hf", **given})
        units = _tokenizer_units(directory)
        if not units:
            raise CheckpointError(
                f"{directory}: cannot tell which tokens are units: no {UNIT_VOCAB_FILE} and no <Un{{u}}> tokens in "
                f"tokenizer.json/vocab.json (write {UNIT_VOCAB_FILE}: {{\"unit_offset\": ..., \"num_units\": ..., "
                "\"bos\": ..., \"eos\": ..., \"pad\": ...}})")
        ids = [units[u] for u in sorted(units)]
        if sorted(units) != list(range(len(units))) or ids != list(range(ids[0], ids[0] + len(ids))):
            raise CheckpointError(f"{directory}: the tokenizer's unit tokens <Un0>..<Un{len(units) - 1}> are not "
                                  f"consecutive token ids; write {UNIT_VOCAB_FILE} instead")
        missing = [k for k in ("bos_token_id", "eos_token_id", "pad_token_id") if not isinstance(cfg.get(k), int)]
        if missing:
            raise CheckpointError(f"{directory}: config.json lacks {', '.join(missing)}; write {UNIT_VOCAB_FILE}")
        return UnitVocab(size=size, num_units=len(ids), unit_offset=ids[0], bos=cfg["bos_token_id"],
                         eos=cfg["eos_token_id"], pad=cfg["pad_token_id"], layout="hf")
    except UnitVocabError as e:
        raise CheckpointError(f"{directory}: {e}") from None


# --------------------------------------------------------------------------------------------------------------
# loading


def _materialise(model: SpeechLM, state: dict[str, Tensor]) -> None:
    """Fill a model built on the meta device with ``state`` (no second copy of the weights), keep the tied
    embedding tied and compute the rotary table."""
    load_state_strict_meta(model, state)
    dec = model.decoder
    if model.cfg.tie_embeddings:
        dec.output_projection.weight = dec.embed_tokens.weight
    if dec.rotary is not None:
        dec.rotary.register_buffer("inv_freq", dec.rotary._inv_freq(dec.rotary.theta), persistent=False)


def load_state_strict_meta(model: torch.nn.Module, state: Mapping[str, Tensor]) -> None:
    """Check keys and shapes as :func:`load_state_strict` does, then assign the tensors (the model is on meta)."""
    ours = model.state_dict()
    problems = sorted(set(ours) ^ set(state)) + [k for k in ours if k in state and ours[k].shape != state[k].shape]
    if problems:
        load_state_strict(model, state, "weights")  # raises its one-line report
    model.load_state_dict(dict(state), strict=True, assign=True)


def _layout(directory: Path) -> tuple[dict[str, Any], dict[str, Any], str]:
    """``(config.json, the decoder's own config, the weights' key prefix)`` of a slamkit or HF directory."""
    top = read_config(directory)
    if top.get("model_type") != SLAMKIT_TYPE:
        return top, dict(top), ""
    base = top.get("base_config")
    if not isinstance(base, Mapping):
        raise CheckpointError(f"{directory / 'config.json'}: a slamkit config without a 'base_config' object")
    return top, {**base, "vocab_size": top.get("vocab_size", base.get("vocab_size"))}, "lm."


def is_decoder_directory(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a speech LM this module loads (slamkit, or ``model_type`` opt/llama/qwen2)."""
    try:
        _, cfg_json, _ = _layout(Path(directory))
    except CheckpointError:
        return False
    return cfg_json.get("model_type") in KEY_TABLES


def hf_names(directory: str | os.PathLike, keys: Iterable[str]) -> dict[str, str]:
    """``{our key: the directory's key}`` for the weight ``keys`` of a slamkit or HF decoder directory (the inverse
    of the key table, prefix included), for writers that change tensors in the original's own names."""
    _, cfg_json, prefix = _layout(Path(directory))
    table = KEY_TABLES.get(cfg_json.get("model_type"))  # type: ignore[arg-type]
    if table is None:
        raise CheckpointError(f"{directory}: model_type {cfg_json.get('model_type')!r} is not a supported decoder")
    out: dict[str, str] = {}
    for key in keys:
        if key.startswith(prefix) and not _ROTARY.fullmatch(key):
            renamed, _ = rename({key[len(prefix):]: torch.empty(0)}, table)
            out.update({ours: key for ours in renamed})
    return out


def load_hf_decoder(
    directory: str | os.PathLike, *, dtype: torch.dtype | None = None
) -> tuple[SpeechLM, UnitVocab]:
    """A slamkit or HF causal-LM directory -> (model in eval mode on CPU, its unit vocabulary).

    Args:
        dtype: hold the weights in this dtype (``torch.bfloat16`` halves a frozen backbone); default float32.
    """
    directory = Path(directory)
    top, cfg_json, prefix = _layout(directory)
    where = directory / "config.json"
    state, source = read_weights(directory)
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    size = int(cfg_json.get("vocab_size") or 0)
    emb = next((v for k, v in state.items() if k.endswith("embed_tokens.weight")), None)
    if emb is not None and emb.shape[0] != size:
        size = emb.shape[0]  # the table is the truth (slamkit resizes the base model's embedding)
        cfg_json["vocab_size"] = size
    vocab = (_slamkit_vocab(directory, top, size) if prefix else _hf_vocab(directory, top, size))
    cfg = decoder_config(cfg_json, where, vocab.pad)
    state, unmatched = rename({k: v for k, v in state.items() if not _ROTARY.fullmatch(k)}, KEY_TABLES[cfg.family])
    if unmatched:
        raise CheckpointError(f"{source}: tensors the {cfg.family} key table does not know: {', '.join(unmatched[:6])}")
    if cfg.tie_embeddings:
        head = state.pop("decoder.output_projection.weight", None)
        if head is not None and not torch.equal(head, state["decoder.embed_tokens.weight"]):
            raise CheckpointError(f"{where}: tie_word_embeddings is true but lm_head differs from the embedding")
        state["decoder.output_projection.weight"] = state.get("decoder.embed_tokens.weight")
    elif "decoder.output_projection.weight" not in state:
        raise CheckpointError(f"{source}: no lm_head.weight and tie_word_embeddings is false (a bare model?)")
    target = dtype or torch.float32
    if not target.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {target}")
    state = {k: v.to(target) for k, v in state.items() if v is not None}
    if cfg.tie_embeddings:
        state["decoder.output_projection.weight"] = state["decoder.embed_tokens.weight"]
    with torch.device("meta"):
        model = SpeechLM(cfg, vocab)
    try:
        _materialise(model, state)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    return model.eval(), vocab


def load_speech_lm(
    path: str | os.PathLike, *, dtype: torch.dtype | None = None
) -> tuple[UnitLM, UnitVocab]:
    """Load any unit LM the toolkit supports (see the module docstring) with its unit vocabulary.

    Args:
        path: a fairseq checkpoint file (``dict.txt`` beside it), or a slamkit / HF causal-LM directory.
        dtype: hold the frozen weights in this dtype (e.g. ``torch.bfloat16``); method tensors stay float32.
    Raises:
        CheckpointError: one line naming the file and the problem.
    """
    path = Path(path)
    if path.is_dir():
        return load_hf_decoder(path, dtype=dtype)
    model, dictionary = load_unit_lm(path, dtype=dtype)
    vocab = UnitVocab.gslm(len(dictionary) - dictionary.nspecial)
    model.unit_vocab = vocab
    return model, vocab


def save_hf_unit_vocab(directory: str | os.PathLike, vocab: UnitVocab) -> None:
    """Write ``unit_vocab.json`` (what :func:`load_speech_lm` reads for a plain HF directory)."""
    fields = {k: v for k, v in vocab.to_dict().items() if k not in ("size", "layout")}
    (Path(directory) / UNIT_VOCAB_FILE).write_text(json.dumps(fields, indent=1) + "\n", encoding="utf-8")


__all__ = ["KEY_TABLES", "SLAMKIT_TYPE", "UNIT_VOCAB_FILE", "decoder_config", "hf_names", "is_decoder_directory",
           "load_hf_decoder", "load_speech_lm", "save_hf_unit_vocab"]
