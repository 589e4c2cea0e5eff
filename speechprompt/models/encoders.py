"""One loader for every supported speech encoder: ``load_encoder(path)`` recognises what it is given.

=================================  ===========================================================================
given                              read as
=================================  ===========================================================================
a directory with ``config.json``   a Hugging Face model (:mod:`speechprompt.models.hf_keys`): wav2vec2, hubert,
                                   data2vec-audio, wavlm, audio-spectrogram-transformer; bare, ``...ForCTC``,
                                   ``...ForSequenceClassification`` (``ASTForAudioClassification``)
a fairseq checkpoint               ``cfg.model._name`` (or legacy ``args.arch``): ``hubert``, ``wav2vec2``,
                                   ``data2vec_audio`` pretraining checkpoints; ``wav2vec_ctc``/``hubert_ctc``
                                   fine-tuned ones, with their letter dictionary (``task_state`` or
                                   ``dict.ltr.txt`` beside the file)
an official WavLM checkpoint       ``{"cfg": {flat WavLM config}, "model": state dict}`` (fairseq-like names)
=================================  ===========================================================================

Checkpoints are read through the safe unpickler of :mod:`speechprompt.fairseq_compat` (no pickled code runs);
Hugging Face weights through safetensors or ``torch.load(weights_only=True)``. Neither fairseq nor transformers is
imported. Anything else is refused with one line naming the file, what was found and what is supported.

Every encoder has the same interface (``hidden_states``, ``extract_features``, ``frame_padding_mask``,
``num_layers``, ``encoder_embed_dim``, ``transformer_layers``, ``remove_pretraining_modules``; waveforms go
through :func:`normalize_waveform` with the returned ``task_cfg`` first), so SUPERB, feature extraction and every
tuning method take any of them::

    enc = load_encoder("wav2vec2-base-960h/")        # a HF Wav2Vec2ForCTC directory
    wav, pad = enc.batch([w1, w2])                   # normalised and padded (B, T), (B, T)
    print(enc.transcribe(wav, pad))                  # greedy CTC: ["HELLO WORLD", ...]
    hidden, frame_mask = enc.model.hidden_states(wav, pad)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from speechprompt.config import ConfigError
from speechprompt.dictionary import Dictionary
from speechprompt.errors import CheckpointError
from speechprompt.fairseq_compat import fairseq_checkpoint_from_raw, omegaconf_to_plain, safe_torch_load
from speechprompt.hf_compat import is_hf_directory
from speechprompt.models.ast import ASTModel
from speechprompt.models.heads import CTCOutput
from speechprompt.models.hf_keys import load_hf_encoder
from speechprompt.models.hubert import HubertConfig, HubertModel, hubert_from_checkpoint
from speechprompt.models.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model, normalize_waveform
from speechprompt.models.weights import load_exact

EncoderModel = Wav2Vec2Model | ASTModel

SUPPORTED = ("Hugging Face directories (config.json + model.safetensors or pytorch_model.bin) of wav2vec2, hubert, "
             "data2vec-audio, wavlm, audio-spectrogram-transformer; fairseq checkpoints of hubert, wav2vec2, "
             "data2vec_audio, wav2vec_ctc, hubert_ctc; official WavLM checkpoints")

# fairseq pretraining checkpoints: model name -> our architecture name.
FAIRSEQ_ENCODERS = {"hubert": "hubert", "wav2vec2": "wav2vec2", "data2vec_audio": "data2vec_audio"}
FAIRSEQ_CTC = ("wav2vec_ctc", "hubert_ctc")
# Top-level names of tensors that only pretraining uses, kept inert (wav2vec 2.0's quantizer and projections,
# data2vec's final_proj, a HuBERT CTC model's leftover label embeddings).
PRETRAINING_ROOTS = ("quantizer", "project_q", "project_inp", "input_quantizer", "final_proj", "target_glu",
                     "label_embs_concat")
# WavLM's own defaults for keys an official cfg may leave out (unilm's WavLMConfig).
WAVLM_DEFAULTS = {"relative_position_embedding": False, "num_buckets": 320, "max_distance": 1280,
                  "gru_rel_pos": False}


@dataclass
class LoadedEncoder:
    """What :func:`load_encoder` returns.

    Attributes:
        model: the encoder, in eval mode (:class:`Wav2Vec2Model`, :class:`HubertModel` or :class:`ASTModel`).
        task_cfg: how waveforms are prepared: ``normalize`` (and ``normalize_eps``), ``sample_rate``.
        head: the checkpoint's own output layer (:class:`CTCOutput`, a classifier) or ``None``.
        source: ``fairseq``, ``wavlm`` or ``huggingface``.
        path: the file (fairseq, WavLM) or weights file (Hugging Face) the weights came from.
    """

    model: EncoderModel
    task_cfg: dict[str, Any]
    head: nn.Module | None
    source: str
    path: Path

    @property
    def architecture(self) -> str:
        """``wav2vec2``, ``hubert``, ``data2vec_audio``, ``wavlm`` or ``ast``."""
        return self.model.architecture

    def to(self, device: str | torch.device) -> LoadedEncoder:
        self.model.to(device)
        if self.head is not None:
            self.head.to(device)
        return self

    def batch(self, wavs: Sequence[np.ndarray | Tensor]) -> tuple[Tensor, Tensor]:
        """Normalise each waveform as the checkpoint expects and pad: ``(B, T)`` and padding mask ``(B, T)``."""
        device = next(self.model.parameters()).device
        items = [normalize_waveform(torch.as_tensor(w, dtype=torch.float32), self.task_cfg) for w in wavs]
        T = max(len(w) for w in items)
        wav = torch.zeros(len(items), T)
        padding = torch.ones(len(items), T, dtype=torch.bool)
        for i, w in enumerate(items):
            wav[i, : len(w)] = w
            padding[i, : len(w)] = False
        return wav.to(device), padding.to(device)

    @torch.no_grad()
    def logits(self, wav: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The checkpoint head's output on a prepared batch: CTC ``(B, F, V)`` or classes ``(B, C)``, and the
        frame padding mask."""
        if self.head is None:
            raise CheckpointError(f"{self.path}: this checkpoint has no output head (a bare encoder)")
        hidden, frame_mask = self.model.hidden_states(wav, padding_mask)
        return self.head(self.model.final_features(hidden), hidden, frame_mask), frame_mask

    def transcribe(self, wav: Tensor, padding_mask: Tensor | None = None) -> list[str]:
        """Greedy CTC decoding with the checkpoint's vocabulary (a CTC fine-tuned checkpoint only)."""
        if not isinstance(self.head, CTCOutput):
            raise CheckpointError(f"{self.path}: not a CTC fine-tuned checkpoint, nothing to transcribe with")
        logits, frame_mask = self.logits(wav, padding_mask)
        return self.head.decode(logits, frame_mask)

    def classify(self, wav: Tensor, padding_mask: Tensor | None = None) -> list[str]:
        """The most likely label per utterance (a classification checkpoint only)."""
        labels = getattr(self.head, "labels", None)
        if labels is None:
            raise CheckpointError(f"{self.path}: not a classification checkpoint")
        logits, _ = self.logits(wav, padding_mask)
        return [labels[i] for i in logits.argmax(dim=-1).tolist()]


def load_encoder(path: str | os.PathLike) -> LoadedEncoder:
    """Load any supported encoder checkpoint (see the module docstring), in eval mode, on the CPU.

    Raises:
        CheckpointError: not found, not a supported format or architecture, or weights that do not match their
            config (one line naming the file).
        UnsafeCheckpointError: a pickle that asks for anything outside the allow-list.
    """
    path = Path(path)
    if path.is_dir():
        model, head, task_cfg, weights = load_hf_encoder(path)
        return LoadedEncoder(model, task_cfg, head, "huggingface", weights)
    if path.name == "config.json" and is_hf_directory(path.parent):
        return load_encoder(path.parent)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.suffix == ".safetensors" or path.name.endswith(".index.json"):
        raise CheckpointError(f"{path}: weights alone cannot be loaded; give the directory with its config.json")
    raw = safe_torch_load(path)
    if not isinstance(raw, dict) or "model" not in raw:
        found = f"a {type(raw).__name__}" if not isinstance(raw, dict) else f"keys {sorted(map(str, raw))[:6]}"
        raise CheckpointError(f"{path}: not an encoder checkpoint (found {found}); supported: {SUPPORTED}")
    cfg = omegaconf_to_plain(raw.get("cfg"))
    if isinstance(cfg, dict) and "model" not in cfg and "encoder_layers" in cfg:
        return _load_wavlm(raw, cfg, path)
    return _load_fairseq(fairseq_checkpoint_from_raw(raw, path), path)


# --------------------------------------------------------------------------------------------------------------
# fairseq


def _model_name(model_cfg: Mapping[str, Any], state: Mapping[str, Tensor] | None = None) -> str | None:
    """The fairseq model name a config records; a config saved without one (a model built and saved by hand, not
    by fairseq's trainer) is named by the tensors only HuBERT has."""
    name = model_cfg.get("_name") or model_cfg.get("arch")
    if name is None and state is not None and "label_embs_concat" in state:
        return "hubert"
    return name


def _encoder_config(model_cfg: Mapping[str, Any], name: str | None, path: Path) -> Wav2Vec2Config:
    if name not in FAIRSEQ_ENCODERS:
        raise CheckpointError(f"{path}: fairseq model {name!r} is not a supported encoder (supported: "
                              f"{', '.join(FAIRSEQ_ENCODERS)}, {', '.join(FAIRSEQ_CTC)})")
    try:
        if name == "hubert":
            return HubertConfig.from_fairseq(model_cfg)
        return Wav2Vec2Config.from_fairseq(model_cfg)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _build(cfg: Wav2Vec2Config, name: str, state: Mapping[str, Tensor]) -> Wav2Vec2Model:
    """The model for ``state``, with its pretraining-only tensors kept inert (see :data:`PRETRAINING_ROOTS`)."""
    if isinstance(cfg, HubertConfig):
        model: Wav2Vec2Model = HubertModel(cfg, pretraining_heads=False)
    else:
        model = Wav2Vec2Model(cfg, FAIRSEQ_ENCODERS[name])
    model.keep_pretraining_tensors({k: v for k, v in state.items() if k.split(".")[0] in PRETRAINING_ROOTS})
    return model


def _load_fairseq(ckpt: dict[str, Any], path: Path) -> LoadedEncoder:
    cfg = ckpt["cfg"]
    model_cfg = cfg.get("model") or {}
    state: dict[str, Tensor] = {k: v for k, v in ckpt["model"].items() if k != "_ema"}  # data2vec's EMA teacher
    name = _model_name(model_cfg, state)
    if name == "hubert":  # its pretraining heads are real modules, sized by the label dictionaries
        model, task_cfg = hubert_from_checkpoint(ckpt, path)
        return LoadedEncoder(model, task_cfg, None, "fairseq", path)
    if name in FAIRSEQ_ENCODERS:
        enc_cfg = _encoder_config(model_cfg, name, path)
        model = _build(enc_cfg, name, state)
        load_exact(model, state, path, f"the {name} architecture its config describes")
        return LoadedEncoder(model.eval(), dict(cfg.get("task") or {}), None, "fairseq", path)
    if name in FAIRSEQ_CTC:
        return _load_fairseq_ctc(ckpt, state, name, path)
    raise CheckpointError(f"{path}: fairseq model {name!r} is not a supported encoder (supported: "
                          f"{', '.join(FAIRSEQ_ENCODERS)}, {', '.join(FAIRSEQ_CTC)})")


def _load_fairseq_ctc(ckpt: dict[str, Any], state: dict[str, Tensor], name: str, path: Path) -> LoadedEncoder:
    """``wav2vec_ctc``/``hubert_ctc``: ``w2v_encoder.w2v_model.*`` (the encoder) + ``w2v_encoder.proj`` (letters)."""
    cfg = ckpt["cfg"]
    w2v_args = (cfg.get("model") or {}).get("w2v_args")
    if not isinstance(w2v_args, dict):
        raise CheckpointError(f"{path}: {name} checkpoint without w2v_args: the encoder's architecture is unknown")
    inner_model = w2v_args.get("model") if isinstance(w2v_args.get("model"), dict) else w2v_args  # legacy: flat
    inner_task = w2v_args.get("task") if isinstance(w2v_args.get("task"), dict) else w2v_args
    inner_model = dict(inner_model)
    for key in ("layer_type",):  # fine-tuning may override these (fairseq's args_replacement)
        if (cfg.get("model") or {}).get(key) is not None:
            inner_model[key] = cfg["model"][key]
    inner_name = _model_name(inner_model) or ("hubert" if name == "hubert_ctc" else "wav2vec2")
    enc_cfg = _encoder_config(inner_model, inner_name, path)

    prefix = "w2v_encoder.w2v_model."
    encoder_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    head_state = {k[len("w2v_encoder."):]: v for k, v in state.items() if k.startswith("w2v_encoder.proj.")}
    other = sorted(k for k in state if not k.startswith(prefix) and not k.startswith("w2v_encoder.proj."))
    if other:
        raise CheckpointError(f"{path}: {name} checkpoint has tensors besides the encoder and its CTC projection "
                              f"(a decoder?): {', '.join(other[:6])}")
    if "proj.weight" not in head_state:
        raise CheckpointError(f"{path}: {name} checkpoint without w2v_encoder.proj (no CTC output layer)")
    model = _build(enc_cfg, inner_name, encoder_state)
    load_exact(model, encoder_state, path, f"the {inner_name} architecture its w2v_args describe")

    dictionary = _letter_dictionary(ckpt, path)
    size = head_state["proj.weight"].shape[0]
    if len(dictionary) != size:
        raise CheckpointError(f"{path}: the CTC projection has {size} outputs, the letter dictionary "
                              f"{len(dictionary)} symbols")
    # fairseq's blank is <s> (index 0), and Dictionary.string drops </s> too; <pad> and <unk> stay, as there.
    head = CTCOutput(model.encoder_embed_dim, dictionary.symbols, blank=dictionary.bos_index, delimiter="|",
                     ignore=[dictionary.eos_index])
    load_exact(head, head_state, path, "its CTC projection")
    task = dict(inner_task)
    task.update({k: v for k, v in (cfg.get("task") or {}).items() if k in ("normalize", "sample_rate")})
    return LoadedEncoder(model.eval(), task, head.eval(), "fairseq", path)


def _letter_dictionary(ckpt: dict[str, Any], path: Path) -> Dictionary:
    """The CTC vocabulary: ``task_state['target_dictionary']``, else ``dict.ltr.txt`` beside the checkpoint."""
    target = (ckpt.get("task_state") or {}).get("target_dictionary")
    if isinstance(target, Dictionary):
        return target
    beside = path.parent / "dict.ltr.txt"
    if beside.is_file():
        return Dictionary.load(beside)
    raise CheckpointError(f"{path}: CTC checkpoint without its letter dictionary (none in task_state, no "
                          f"{beside.name} beside it)")


# --------------------------------------------------------------------------------------------------------------
# WavLM's official format


def _load_wavlm(raw: dict[str, Any], cfg: dict[str, Any], path: Path) -> LoadedEncoder:
    state = raw["model"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: WavLM checkpoint whose 'model' is not a state dict")
    merged = {**WAVLM_DEFAULTS, **cfg}
    try:
        enc_cfg = Wav2Vec2Config.from_fairseq(merged)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    model = Wav2Vec2Model(enc_cfg, "wavlm" if enc_cfg.relative_position_embedding else "wav2vec2")
    model.keep_pretraining_tensors({k: v for k, v in state.items() if k.split(".")[0] in PRETRAINING_ROOTS})
    load_exact(model, state, path, "the WavLM architecture its cfg describes")
    task_cfg = {"normalize": bool(cfg.get("normalize", False)), "sample_rate": 16000}
    return LoadedEncoder(model.eval(), task_cfg, None, "wavlm", path)
