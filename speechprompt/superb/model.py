"""The SUPERB model: a (tuned) upstream encoder, a learned weighted sum of its layers, and a task head.

    waveform (B, T) --upstream [+ prefix / adapter / LoRA / BitFit / S3-Router mask]--> L+1 hidden states (B, F, D)
        --WeightedLayerSum (softmax weights, optional per-state LayerNorm)--> (B, F, D)
        --head--> classification: mean over valid frames, Linear(D, C)      (accuracy)
                  ctc:            Linear(D, characters + blank), greedy CTC  (WER, CER)

:func:`build_superb` makes a fresh model for training; :func:`load_superb` rebuilds a trained one from its task
checkpoint (the upstream found and fingerprint-checked by :func:`speechprompt.checkpoint.load_base`).
"""

from __future__ import annotations

import enum
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
from speechprompt.models.wav2vec2 import normalize_waveform
from speechprompt.tasks.ctc import CharVocabulary, ctc_loss, greedy_decode, normalize_text
from speechprompt.tasks.metrics import accuracy, cer, wer
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


class HeadKind(str, enum.Enum):
    """The downstream task head."""

    CLASSIFICATION = "classification"
    CTC = "ctc"


class ClassificationHead(nn.Module):
    """Utterance classification: mean over the valid frames, then ``Linear(D, C)``.

    Args:
        dim: feature size ``D``.
        labels: the classes in index order.

    Shapes: features ``(B, F, D)`` and frame padding mask ``(B, F)`` (True at padding) in; logits ``(B, C)`` out.
    """

    default_metric = "accuracy"
    higher_is_better = True

    def __init__(self, dim: int, labels: Sequence[str]) -> None:
        super().__init__()
        self.labels = list(labels)
        self._index = {label: i for i, label in enumerate(self.labels)}
        self.proj = nn.Linear(dim, len(self.labels))

    @classmethod
    def from_train_labels(cls, dim: int, labels: Sequence[str]) -> ClassificationHead:
        """Classes = the sorted distinct training labels."""
        classes = sorted(set(labels))
        if len(classes) < 2:
            raise ConfigError(f"classification needs at least 2 classes in the training labels, got {classes}")
        return cls(dim, classes)

    @classmethod
    def from_meta(cls, dim: int, meta: dict[str, Any]) -> ClassificationHead:
        return cls(dim, meta["labels"])

    def describe(self) -> dict[str, Any]:
        """What the sidecar stores to rebuild this head."""
        return {"labels": self.labels}

    def forward(self, features: Tensor, frame_mask: Tensor) -> Tensor:
        valid = (~frame_mask)[..., None].to(features.dtype)  # (B, F, 1)
        pooled = (features * valid).sum(1) / valid.sum(1).clamp(min=1)  # (B, D)
        return self.proj(pooled)  # (B, C)

    def loss(self, output: Tensor, frame_mask: Tensor, refs: Sequence[str]) -> tuple[Tensor, int]:
        """Summed cross-entropy and its number of terms; a label outside the training classes (dev only) is
        ignored."""
        targets = torch.tensor([self._index.get(r, -1) for r in refs], device=output.device)
        return F.cross_entropy(output.float(), targets, ignore_index=-1, reduction="sum"), int(targets.ge(0).sum())

    def decode(self, output: Tensor, frame_mask: Tensor) -> list[str]:
        return [self.labels[i] for i in output.argmax(dim=-1).tolist()]

    def metrics(self, refs: Sequence[str], hyps: Sequence[str]) -> dict[str, float]:
        return {"accuracy": accuracy(refs, hyps)}


class CTCHead(nn.Module):
    """Character recognition: ``Linear(D, V)`` per frame, CTC loss, greedy decoding.

    Args:
        dim: feature size ``D``.
        vocab: the characters (``V = len(vocab)``, blank included).

    Shapes: features ``(B, F, D)`` and frame padding mask ``(B, F)`` in; log-probabilities ``(B, F, V)`` out.
    """

    default_metric = "wer"
    higher_is_better = False

    def __init__(self, dim: int, vocab: CharVocabulary) -> None:
        super().__init__()
        self.vocab = vocab
        self.proj = nn.Linear(dim, len(vocab))

    @classmethod
    def from_train_labels(cls, dim: int, labels: Sequence[str]) -> CTCHead:
        """Characters = those of the training transcripts."""
        return cls(dim, CharVocabulary.from_texts(labels))

    @classmethod
    def from_meta(cls, dim: int, meta: dict[str, Any]) -> CTCHead:
        return cls(dim, CharVocabulary.from_dict(meta["vocabulary"]))

    def describe(self) -> dict[str, Any]:
        return {"vocabulary": self.vocab.to_dict()}

    def forward(self, features: Tensor, frame_mask: Tensor) -> Tensor:
        return F.log_softmax(self.proj(features), dim=-1)  # (B, F, V)

    def loss(self, output: Tensor, frame_mask: Tensor, refs: Sequence[str]) -> tuple[Tensor, int]:
        """Summed CTC loss (each utterance's over its target length) and the number of utterances."""
        lengths = (~frame_mask).sum(1)  # (B,)
        return ctc_loss(output, lengths, [self.vocab.encode(r) for r in refs], blank=self.vocab.blank)

    def decode(self, output: Tensor, frame_mask: Tensor) -> list[str]:
        paths = greedy_decode(output, (~frame_mask).sum(1), blank=self.vocab.blank)
        return [self.vocab.decode(p) for p in paths]

    def metrics(self, refs: Sequence[str], hyps: Sequence[str]) -> dict[str, float]:
        refs = [normalize_text(r) for r in refs]
        return {"wer": wer(refs, hyps), "cer": cer(refs, hyps)}


HEADS: dict[HeadKind, type[ClassificationHead] | type[CTCHead]] = {
    HeadKind.CLASSIFICATION: ClassificationHead,
    HeadKind.CTC: CTCHead,
}


class SuperbModel(nn.Module):
    """A (tuned) upstream encoder, the weighted layer sum and a head.

    Args:
        upstream: the encoder (any architecture of :mod:`speechprompt.models.encoders`), with ``method`` attached.
        method: the tuning method (its :meth:`~TuningMethod.forward_kwargs` go to the upstream).
        featurizer: the weighted sum over ``upstream.num_layers + 1`` hidden states.
        head: a :class:`ClassificationHead` or :class:`CTCHead`.
        task_cfg: the upstream checkpoint's task config (whether waveforms are normalised).
        upstream_dropout: keep the upstream's dropout active in training mode (off: the upstream always runs in
            eval mode, as SUPERB does for a frozen upstream).

    Shapes: ``forward(wav (B, T), padding_mask (B, T))`` gives the head's output and the ``(B, F)`` frame padding
    mask (True at padding).
    """

    def __init__(self, upstream: EncoderModel, method: TuningMethod, featurizer: WeightedLayerSum, head: nn.Module,
                 task_cfg: dict[str, Any], upstream_dropout: bool = False) -> None:
        super().__init__()
        self.upstream, self.method, self.featurizer, self.head = upstream, method, featurizer, head
        self.task_cfg = dict(task_cfg)
        self.upstream_dropout = upstream_dropout

    @property
    def decoder(self) -> str:
        """The name its predictions go under in reports: ``argmax`` (classification head) or ``greedy`` (CTC)."""
        return "argmax" if isinstance(self.head, ClassificationHead) else "greedy"

    def train(self, mode: bool = True) -> SuperbModel:
        super().train(mode)
        self.upstream.train(mode and self.upstream_dropout)
        # The method's own modules (LoRA branches, adapters) sit inside the upstream but belong to the task: their
        # dropout follows the run, not the frozen upstream's eval mode.
        self.method.train(mode)
        return self

    def head_state_dict(self) -> dict[str, Tensor]:
        """The weighted-sum weights and the head (``featurizer.*``, ``head.*``): the checkpoint's head part."""
        state = {f"featurizer.{k}": v for k, v in self.featurizer.state_dict().items()}
        state.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        return {k: v.detach() for k, v in state.items()}

    def load_head_state_dict(self, state: dict[str, Tensor], source: str | os.PathLike) -> None:
        load_into(self.featurizer, {k[len("featurizer."):]: v for k, v in state.items()
                                    if k.startswith("featurizer.")}, "featurizer", source)
        load_into(self.head, {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}, "head",
                  source)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Freeze the upstream except the method's own tensors; returns those plus the featurizer and head."""
        return freeze_except(self.upstream, self.method) + list(self.featurizer.parameters()) + list(
            self.head.parameters())

    def prepare(self, wavs: Sequence[np.ndarray | Tensor]) -> tuple[Tensor, Tensor]:
        """Normalise each waveform (if the upstream expects it) and pad them: ``(B, T)`` and mask ``(B, T)``."""
        device = self.featurizer.weights.device
        items = [normalize_waveform(torch.as_tensor(w, dtype=torch.float32), self.task_cfg) for w in wavs]
        T = max(len(w) for w in items)
        wav = torch.zeros(len(items), T)
        padding = torch.ones(len(items), T, dtype=torch.bool)
        for i, w in enumerate(items):
            wav[i, : len(w)] = w
            padding[i, : len(w)] = False
        return wav.to(device), padding.to(device)

    def forward(self, wav: Tensor, padding_mask: Tensor) -> tuple[Tensor, Tensor]:
        # An upstream with nothing trainable in it needs no graph: saves the activations of every layer.
        tuned = any(p.requires_grad for p in self.method.parameters()) and torch.is_grad_enabled()
        with torch.set_grad_enabled(tuned):
            hidden, frame_mask = self.upstream.hidden_states(
                wav, padding_mask, **self.method.forward_kwargs(wav.shape[0]))  # L+1 x (B, F, D)
        assert frame_mask is not None  # a padding mask always comes in
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


def build_superb(
    upstream_path: str | os.PathLike,
    method: Any,
    head: HeadKind | str,
    train_labels: Sequence[str],
    layer_norm: bool = False,
    upstream_dropout: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[SuperbModel, str]:
    """A fresh model for training.

    Args:
        upstream_path: an encoder checkpoint (fairseq file or Hugging Face directory).
        method: a registered method name or config (not ``prompt``).
        head: ``classification`` or ``ctc``.
        train_labels: the training labels or transcripts (they size the head).
        layer_norm: LayerNorm each hidden state before the weighted sum.
        upstream_dropout: see :class:`SuperbModel`.
        device: where the model goes.

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
    tuning = build_method(config, upstream)
    featurizer = WeightedLayerSum(upstream.num_layers + 1, layer_norm)
    head_module = HEADS[HeadKind(head)].from_train_labels(upstream.encoder_embed_dim, train_labels)
    model = SuperbModel(upstream, tuning, featurizer, head_module, task_cfg, upstream_dropout).to(device)
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
    featurizer = WeightedLayerSum(model.num_layers + 1, superb["layer_norm"])
    head = HEADS[HeadKind(superb["head"])].from_meta(model.encoder_embed_dim, meta["task"])
    out = SuperbModel(model, method, featurizer, head, task_cfg, superb.get("upstream_dropout", False)).to(device)
    out.load_head_state_dict({k: v.to(device) for k, v in ckpt.head_state.items()}, ckpt.path)
    freeze_except(model, method)
    return out.eval()
