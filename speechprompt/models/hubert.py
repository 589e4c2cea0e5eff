"""HuBERT in plain PyTorch, loading fairseq checkpoints key for key without fairseq.

HuBERT is the wav2vec 2.0 encoder of :mod:`speechprompt.models.wav2vec2` plus its pretraining heads, and fairseq's
HuBERT turns a sample padding mask into a frame one by its own rule (``frame_padding="chunks"``). The module tree
mirrors fairseq's ``HubertModel`` so that ``hubert_base_ls960.pt`` loads with ``strict=True``::

    feature_extractor, layer_norm, post_extract_proj, mask_emb, encoder    see speechprompt.models.wav2vec2
    final_proj, target_glu, label_embs_concat                              pretraining heads (what
                                                                           speechprompt.models.hubert_pretraining
                                                                           trains), kept so that the state dict
                                                                           matches

The multilingual variants are the same model with another conv stack (mHuBERT-25Hz: one more stride-2 conv,
640 samples per frame); ``conv_feature_layers`` describes any stack.

Typical use::

    model, task_cfg = load_hubert("hubert_base_ls960.pt")
    wav = normalize_waveform(torch.from_numpy(load_audio(path)), task_cfg)
    feats = model.extract_features(wav[None], output_layer=6)  # (1, frames, 768) at 50 Hz

:func:`speechprompt.models.encoders.load_encoder` loads HuBERT from Hugging Face directories and CTC fine-tuned
checkpoints too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from speechprompt.config import ConfigError, option
from speechprompt.errors import CheckpointError
from speechprompt.fairseq_compat import load_fairseq_checkpoint
from speechprompt.models.wav2vec2 import (
    ConvFeatureExtractor,
    ExtractorMode,
    FramePadding,
    SamePad,
    Wav2Vec2Config,
    Wav2Vec2Encoder,
    Wav2Vec2Model,
    WeightNormConv1d,
    normalize_waveform,
    parse_conv_layers,
)
from speechprompt.models.weights import load_exact

__all__ = [
    "ConvFeatureExtractor",
    "ExtractorMode",
    "HubertConfig",
    "HubertEncoder",
    "HubertModel",
    "SamePad",
    "WeightNormConv1d",
    "hubert_from_checkpoint",
    "load_hubert",
    "normalize_waveform",
    "parse_conv_layers",
]

HubertEncoder = Wav2Vec2Encoder  # the name this module used before the encoder was shared

# --------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class HubertConfig(Wav2Vec2Config):
    """Architecture of a HuBERT model. Field names and defaults are those of fairseq's ``HubertConfig``.

    The encoder fields are :class:`Wav2Vec2Config`'s; HuBERT adds its pretraining heads' sizes and pads frames by
    fairseq HuBERT's rule.
    """

    frame_padding: str = option(FramePadding.CHUNKS.value, help="sample -> frame padding rule: 'chunks' "
                                         "(fairseq HuBERT) or 'lengths' (HF HuBERT)")
    final_dim: int = option(0, help="pretraining projection size; <= 0 means encoder_embed_dim")
    untie_final_proj: bool = option(False, help="one pretraining projection per label set")
    target_glu: bool = option(False, help="GLU on the pretraining targets")

    @classmethod
    def from_fairseq(cls, model_cfg: Mapping[str, Any], **overrides: Any) -> HubertConfig:
        """Build from the ``model`` section of a fairseq checkpoint's ``cfg`` (a plain dict).

        Keys that do not affect feature extraction are ignored. Keys that would change the architecture into one
        this class does not implement (conformer layers, a deep or batch-normed positional conv) are errors.

        Raises:
            ConfigError: an unsupported architecture, or a value of the wrong type.
        """
        name = model_cfg.get("_name")
        if name is not None and name != "hubert":
            raise ConfigError(f"model is {name!r}; only pretrained 'hubert' checkpoints are supported")
        depth = model_cfg.get("pos_conv_depth", 1)
        if depth != 1:
            raise ConfigError(f"pos_conv_depth={depth!r} is not supported (only 1)")
        out = super().from_fairseq(model_cfg, **overrides)
        assert isinstance(out, HubertConfig)
        return out

    @classmethod
    def base(cls) -> HubertConfig:
        """``hubert_base_ls960``: 12 post-LN layers of width 768 (94.7M parameters with the pretraining heads)."""
        return cls(final_dim=256, dropout_input=0.1, feature_grad_mult=0.1, untie_final_proj=True)

    @classmethod
    def large(cls) -> HubertConfig:
        """``hubert_large_ll60k``: 24 pre-LN layers of width 1024, LayerNorm after every conv."""
        return cls(extractor_mode=ExtractorMode.LAYER_NORM, encoder_layers=24, encoder_embed_dim=1024,
                   encoder_ffn_embed_dim=4096, encoder_attention_heads=16, layer_norm_first=True, final_dim=768,
                   dropout=0.0, attention_dropout=0.0, untie_final_proj=True)

    @classmethod
    def tiny(cls, layer_norm_first: bool = False) -> HubertConfig:
        """A 2-layer, 32-wide model for tests (conv stride 80, receptive field 100 samples)."""
        return cls(
            extractor_mode=ExtractorMode.LAYER_NORM if layer_norm_first else ExtractorMode.DEFAULT,
            conv_feature_layers="[(16,10,5)] + [(16,3,2)] * 2 + [(16,2,2)] * 2",
            encoder_layers=2, encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=4,
            layer_norm_first=layer_norm_first, conv_pos=8, conv_pos_groups=4, final_dim=8,
            dropout=0.0, attention_dropout=0.0,
        )


# --------------------------------------------------------------------------------------------------------------
# The model


class HubertModel(Wav2Vec2Model):
    """HuBERT: waveform ``(B, T)`` to frame representations ``(B, frames, D)`` at ``sample_rate / 320`` Hz.

    Args:
        cfg: the architecture.
        num_classes: sizes of the pretraining label sets (one per fairseq dictionary); ``None`` or empty builds no
            ``label_embs_concat``, as fairseq does when it has no dictionaries.
        pretraining_heads: build ``final_proj`` (and ``target_glu``); checkpoints stripped of them set False.

    The interface is :class:`~speechprompt.models.wav2vec2.Wav2Vec2Model`'s.
    """

    cfg: HubertConfig

    def __init__(self, cfg: HubertConfig, num_classes: Sequence[int] | None = None,
                 pretraining_heads: bool = True) -> None:
        super().__init__(cfg, architecture="hubert")
        D = cfg.encoder_embed_dim
        final_dim = cfg.final_dim if cfg.final_dim > 0 else D
        num_classes = list(num_classes or [])
        self.target_glu = None
        self.final_proj = None
        if pretraining_heads:
            if cfg.target_glu:
                self.target_glu = nn.Sequential(nn.Linear(final_dim, final_dim * 2), nn.GLU())
            n_proj = max(len(num_classes), 1) if cfg.untie_final_proj else 1
            self.final_proj = nn.Linear(D, final_dim * n_proj)
        self.num_classes = num_classes
        self.label_embs_concat = (
            nn.Parameter(torch.empty(sum(num_classes), final_dim).uniform_()) if num_classes else None
        )

    def remove_pretraining_modules(self) -> None:
        """Drop the pretraining heads, which feature extraction never uses (fairseq's method of the same name)."""
        super().remove_pretraining_modules()
        self.final_proj = self.target_glu = self.label_embs_concat = None


# --------------------------------------------------------------------------------------------------------------
# Loading


def load_hubert(path: str | os.PathLike) -> tuple[HubertModel, dict[str, Any]]:
    """Load a fairseq HuBERT pretraining checkpoint (``hubert_base_ls960.pt`` and kin) without fairseq.

    The file is read through the safe unpickler of :mod:`speechprompt.fairseq_compat`; nothing in it is executed.
    (:func:`speechprompt.models.encoders.load_encoder` reads every other supported encoder format.)

    Returns:
        The model in eval mode, and the task config (a plain dict; see :func:`normalize_waveform`).

    Raises:
        CheckpointError: unreadable file, unsupported architecture, or state-dict keys/shapes that do not match
            the architecture its config describes (the message lists them).
        UnsafeCheckpointError: the pickle asks for anything outside the allow-list.
    """
    return hubert_from_checkpoint(load_fairseq_checkpoint(path), path)


def hubert_from_checkpoint(ckpt: Mapping[str, Any], path: str | os.PathLike) -> tuple[HubertModel, dict[str, Any]]:
    """:func:`load_hubert` on a checkpoint already read by ``load_fairseq_checkpoint`` (``path`` is named in
    errors)."""
    cfg = ckpt["cfg"]
    try:
        model_cfg = HubertConfig.from_fairseq(cfg.get("model") or {})
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    task_cfg = dict(cfg.get("task") or {})
    dictionaries = ckpt["task_state"].get("dictionaries") or []
    state = ckpt["model"]
    # The pretraining heads may have been stripped (fairseq's remove_pretraining_modules); all else must match.
    has_heads = any(k.startswith("final_proj.") for k in state)
    num_classes = [len(d) for d in dictionaries if d is not None] if "label_embs_concat" in state else []
    model = HubertModel(model_cfg, num_classes, pretraining_heads=has_heads)
    load_exact(model, state, path, "the HuBERT architecture its config describes")
    return model.eval(), task_cfg
