"""The SUPERB model: a (tuned) upstream encoder, a learned weighted sum of its layers, and a task head.

    waveform (B, T) --upstream [+ prefix / adapter / LoRA / BitFit / S3-Router mask / full fine-tuning]
        --> L+1 hidden states (B, F, D)
        --WeightedLayerSum (softmax weights, optional per-state LayerNorm)--> (B, F, D)   (most heads)
          or the encoder's final output (B, F, D)                                        (encoder_ctc, ast)
        --head (speechprompt.superb.heads, .ctc_heads; chosen by name)--> logits / log-probabilities

What the head reads is part of its registration (:mod:`speechprompt.superb.head_registry`). For fairseq-style CTC
fine-tuning the model can also keep the upstream frozen for the first updates (:attr:`SuperbModel.freeze_upstream`,
set by the trainer from ``freeze_upstream_updates``) and mask spans of the encoder's features while training
(:mod:`speechprompt.superb.feature_mask`).

:func:`build_superb` makes a fresh model for training; :func:`load_superb` rebuilds a trained one from its task
checkpoint (the upstream found and fingerprint-checked by :func:`speechprompt.checkpoint.load_base`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechprompt.checkpoint import base_fingerprint, load_base, load_checkpoint, load_into
from speechprompt.config import ConfigError
from speechprompt.errors import CheckpointError
from speechprompt.models.encoders import EncoderModel, load_encoder
from speechprompt.models.wav2vec2 import Wav2Vec2Model, normalize_waveform
from speechprompt.superb import ctc_heads, heads  # noqa: F401  (registers every head)
from speechprompt.superb.feature_mask import FeatureMaskConfig, feature_masker
from speechprompt.superb.head_registry import Features, build_head, head_spec, rebuild_head
from speechprompt.tuning import TuningMethod, build_method, freeze_except, method_config, method_name

TASK_TYPE = "superb"  # the sidecar's task.type of every SUPERB checkpoint


class WeightedLayerSum(nn.Module):
    """SUPERB's featurizer: ``sum_l softmax(w)_l * h_l`` over the upstream's hidden states.

    Args:
        num_states: how many hidden states are summed (``num_layers + 1``: the transformer's input and each
            layer's output).
        layer_norm: normalise each state over its features (no affine) before the sum, as s3prl's
            ``layer_norm`` option, so that no layer dominates by its scale alone.

    Shapes: ``num_states`` tensors ``(B, F, D)`` in, ``(B, F, D)`` out. The weights start at zero: a uniform
    average.
    """

    def __init__(self, num_states: int, layer_norm: bool = False) -> None:
        super().__init__()
        if num_states < 1:
            raise ValueError(f"num_states must be >= 1, got {num_states}")
        self.layer_norm = layer_norm
        self.weights = nn.Parameter(torch.zeros(num_states))

    def normalized_weights(self) -> Tensor:
        """The softmax-normalised layer weights ``(num_states,)`` (what a reader inspects after training)."""
        return F.softmax(self.weights, dim=0)

    def forward(self, hidden: Sequence[Tensor]) -> Tensor:
        if len(hidden) != self.weights.numel():
            raise ValueError(f"expected {self.weights.numel()} hidden states, got {len(hidden)}")
        stacked = torch.stack(list(hidden), dim=0).float()  # (L, B, F, D)
        if self.layer_norm:
            stacked = F.layer_norm(stacked, stacked.shape[-1:])
        w = self.normalized_weights()
        return (w[:, None, None, None] * stacked).sum(dim=0)  # (B, F, D)


class SuperbModel(nn.Module):
    """A (tuned) upstream encoder, the weighted layer sum (or the encoder's final output) and a head.

    Args:
        upstream: the encoder (any architecture of :mod:`speechprompt.models.encoders`), with ``method`` attached.
        method: the tuning method (its :meth:`~TuningMethod.forward_kwargs` go to the upstream).
        featurizer: the weighted sum over ``upstream.num_layers + 1`` hidden states; ``None`` for a head that reads
            the encoder's final output.
        head: a registered head (:mod:`speechprompt.superb.head_registry`).
        task_cfg: the upstream checkpoint's task config (whether waveforms are normalised).
        upstream_dropout: keep the upstream's dropout active in training mode (off: the upstream always runs in
            eval mode, as SUPERB does for a frozen upstream).
        feature_mask: span masking of the encoder's features while training (fairseq fine-tuning); ``None``: none.
        exact_padding: run a wav2vec 2.0-family upstream in its exact padding mode, so that each utterance of a
            padded batch gets the features it gets alone (see ``Wav2Vec2Model.extract_features``); off, padding
            is seen as fairseq and s3prl see it (GroupNorm statistics over the padded length).

    Attributes:
        freeze_upstream: run the upstream without gradients even where the method trains it (fairseq's
            ``freeze_finetune_updates``: only the head learns while the trainer keeps this on).

    Shapes: ``forward(wav (B, T), padding_mask (B, T))`` gives the head's output and the ``(B, F)`` frame padding
    mask (True at padding).
    """

    def __init__(self, upstream: EncoderModel, method: TuningMethod, featurizer: WeightedLayerSum | None,
                 head: nn.Module, task_cfg: dict[str, Any], upstream_dropout: bool = False,
                 feature_mask: FeatureMaskConfig | None = None, exact_padding: bool = False) -> None:
        super().__init__()
        self.upstream, self.method, self.featurizer, self.head = upstream, method, featurizer, head
        self.task_cfg = dict(task_cfg)
        self.upstream_dropout = upstream_dropout
        self.exact_padding = exact_padding and isinstance(upstream, Wav2Vec2Model)  # the wav2vec 2.0 family only
        self.freeze_upstream = False
        self.upstream_parameters: int | None = None  # of the upstream as stored (set by build_superb)
        self._masker = None
        if feature_mask is not None and feature_mask.enabled:
            if not isinstance(upstream, Wav2Vec2Model):
                raise ConfigError(f"feature_mask needs a wav2vec 2.0-family upstream, not {upstream.architecture}")
            self._masker = feature_masker(feature_mask, upstream.mask_emb)

    @property
    def decoder(self) -> str:
        """The name its predictions go under in reports: ``argmax`` (classification) or ``greedy`` (CTC)."""
        return self.head.decoder

    def layer_weights(self) -> list[float] | None:
        """The learned softmax weight of each hidden state (``None`` for a head on the final output)."""
        return self.featurizer.normalized_weights().tolist() if self.featurizer is not None else None

    def train(self, mode: bool = True) -> SuperbModel:
        super().train(mode)
        self.upstream.train(mode and self.upstream_dropout)
        # The method's own modules (LoRA branches, adapters) sit inside the upstream but belong to the task: their
        # dropout follows the run, not the frozen upstream's eval mode.
        self.method.train(mode)
        return self

    def head_state_dict(self) -> dict[str, Tensor]:
        """The weighted-sum weights and the head (``featurizer.*``, ``head.*``): the checkpoint's head part."""
        state = {}
        if self.featurizer is not None:
            state.update({f"featurizer.{k}": v for k, v in self.featurizer.state_dict().items()})
        state.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        return {k: v.detach() for k, v in state.items()}

    def load_head_state_dict(self, state: dict[str, Tensor], source: str | os.PathLike) -> None:
        if self.featurizer is not None:
            load_into(self.featurizer, {k[len("featurizer."):]: v for k, v in state.items()
                                        if k.startswith("featurizer.")}, "featurizer", source)
        load_into(self.head, {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}, "head",
                  source)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Freeze the upstream except the method's own tensors; returns those plus the featurizer and head."""
        extra = list(self.featurizer.parameters()) if self.featurizer is not None else []
        return freeze_except(self.upstream, self.method) + extra + list(self.head.parameters())

    def prepare(self, wavs: Sequence[np.ndarray | Tensor]) -> tuple[Tensor, Tensor]:
        """Normalise each waveform (if the upstream expects it) and pad them: ``(B, T)`` and mask ``(B, T)``."""
        device = next(self.head.parameters()).device
        items = [normalize_waveform(torch.as_tensor(w, dtype=torch.float32), self.task_cfg) for w in wavs]
        T = max(len(w) for w in items)
        wav = torch.zeros(len(items), T)
        padding = torch.ones(len(items), T, dtype=torch.bool)
        for i, w in enumerate(items):
            wav[i, : len(w)] = w
            padding[i, : len(w)] = False
        return wav.to(device), padding.to(device)

    def forward(self, wav: Tensor, padding_mask: Tensor) -> tuple[Tensor, Tensor]:
        # An upstream with nothing trainable in it (or frozen for now) needs no graph: saves every layer's
        # activations. fairseq runs the whole encoder, its output included, without gradients while it is frozen.
        tuned = (not self.freeze_upstream and torch.is_grad_enabled()
                 and any(p.requires_grad for p in self.method.parameters()))
        kwargs = self.method.forward_kwargs(wav.shape[0])
        if self.training and self._masker is not None:
            kwargs["feature_mask"] = self._masker
        if self.exact_padding:
            kwargs["exact_padding"] = True
        with torch.set_grad_enabled(tuned):
            hidden, frame_mask = self.upstream.hidden_states(wav, padding_mask, **kwargs)  # L+1 x (B, F, D)
            if self.featurizer is None:
                features = self.upstream.final_features(hidden)  # (B, F, D)
        assert frame_mask is not None  # a padding mask always comes in
        if self.featurizer is not None:
            features = self.featurizer(hidden)  # (B, F, D)
        return self.head(features, frame_mask), frame_mask


def check_method(name: str) -> None:
    """Refuse a method that cannot tune an encoder (the unit LM's input prompt)."""
    if name == "prompt":
        raise ConfigError("method.name=prompt tunes the unit LM's input; on an encoder use prefix (deep key/value "
                          "prefixes), adapter, lora, bitfit, mask, linear_probe (frozen) or full_finetune")


def load_upstream(path: str | os.PathLike) -> tuple[EncoderModel, dict[str, Any]]:
    """The upstream as stored (what its fingerprint is taken of) and its task config: any encoder that
    :func:`~speechprompt.models.encoders.load_encoder` reads (fairseq or Hugging Face; a fine-tuned checkpoint's own
    head is not used)."""
    if not Path(path).exists():
        raise CheckpointError(f"upstream checkpoint {path} does not exist")
    loaded = load_encoder(path)
    return loaded.model, loaded.task_cfg


def _featurizer(head: str, upstream: EncoderModel, layer_norm: bool) -> WeightedLayerSum | None:
    """The weighted layer sum when the head reads it, else ``None`` (the head reads the final output)."""
    if head_spec(head).features is Features.FINAL:
        return None
    return WeightedLayerSum(upstream.num_layers + 1, layer_norm)


def build_superb(
    upstream_path: str | os.PathLike,
    method: Any,
    head: str,
    train_labels: Sequence[str],
    layer_norm: bool = False,
    upstream_dropout: bool = False,
    device: str | torch.device = "cpu",
    head_options: dict[str, Any] | None = None,
    feature_mask: FeatureMaskConfig | None = None,
    exact_padding: bool = False,
) -> tuple[SuperbModel, str]:
    """A fresh model for training.

    Args:
        upstream_path: an encoder checkpoint (fairseq file or Hugging Face directory).
        method: a registered method name or config (not ``prompt``).
        head: a registered head (``classification``, ``utterance``, ``multislot``, ``ast``, ``ctc``,
            ``bilstm_ctc``, ``encoder_ctc``).
        train_labels: the training labels or transcripts (they size the head).
        layer_norm: LayerNorm each hidden state before the weighted sum.
        upstream_dropout: see :class:`SuperbModel`.
        device: where the model goes.
        head_options: the head's options (its options dataclass as a mapping).
        feature_mask: see :class:`SuperbModel`.
        exact_padding: see :class:`SuperbModel`.

    Returns:
        The model (on ``device``; nothing frozen yet, see :meth:`SuperbModel.trainable_parameters`) and the
        upstream's fingerprint.
    """
    config = method_config(method) if isinstance(method, str) else method
    check_method(method_name(config))
    upstream, task_cfg = load_upstream(upstream_path)
    fingerprint = base_fingerprint(upstream)
    upstream.remove_pretraining_modules()  # never used downstream; dropped after the fingerprint of the stored model
    upstream.to(device)
    n_upstream = sum(p.numel() for p in upstream.parameters())  # before a method adds its own
    tuning = build_method(config, upstream)
    head_module = build_head(str(head), upstream.encoder_embed_dim, train_labels, head_options)
    model = SuperbModel(upstream, tuning, _featurizer(str(head), upstream, layer_norm), head_module, task_cfg,
                        upstream_dropout, feature_mask, exact_padding).to(device)
    model.upstream_parameters = n_upstream
    return model, fingerprint


def load_superb(path: str | os.PathLike, upstream: str | os.PathLike | None = None,
                device: str | torch.device = "cpu") -> SuperbModel:
    """Rebuild a trained model from its task checkpoint, in eval mode.

    Args:
        path: ``NAME.safetensors``, ``NAME.json`` or ``NAME``.
        upstream: the encoder checkpoint (default: the path recorded at training time, as given, else absolute;
            see :func:`speechprompt.checkpoint.load_base`).
        device: where the model goes.

    Raises:
        CheckpointError: not a SUPERB checkpoint, or an upstream whose fingerprint differs from the one trained on.
    """
    ckpt = load_checkpoint(path)
    meta = ckpt.meta
    if meta.get("task", {}).get("type") != TASK_TYPE:
        kind = meta.get("task", {}).get("type")
        raise CheckpointError(f"{ckpt.path} is not a SUPERB checkpoint (its task type is {kind!r})")
    model, task_cfg, _ = load_base(ckpt, upstream, load_upstream, what="upstream", flag="--upstream")
    model.remove_pretraining_modules()
    model.to(device)
    method = build_method(method_config(meta["method"]["name"], meta["method"].get("config")), model)
    method.load_exported_state_dict({k: v.to(device) for k, v in ckpt.method_state.items()})
    superb = meta["superb"]
    head_name = superb["head"]
    try:
        head = rebuild_head(head_name, model.encoder_embed_dim, meta["task"], superb.get("head_options"))
    except ConfigError as e:
        raise CheckpointError(f"{ckpt.path}: its head cannot be rebuilt: {e}") from None
    out = SuperbModel(model, method, _featurizer(head_name, model, superb["layer_norm"]), head, task_cfg,
                      superb.get("upstream_dropout", False),
                      exact_padding=superb.get("exact_padding", False)).to(device)
    out.load_head_state_dict({k: v.to(device) for k, v in ckpt.head_state.items()}, ckpt.path)
    freeze_except(model, method)
    return out.eval()
