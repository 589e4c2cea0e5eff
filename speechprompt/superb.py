"""SUPERB-style training on the HuBERT encoder: a learned weighted sum of layers and a small task head.

    speechprompt superb --config recipes/superb_hubert/conf/ks_frozen.yaml seed=1 run_dir=exp/superb/ks_frozen

The model is the SUPERB protocol (Yang et al., 2021) with the efficient-tuning methods of the speech SSL study
placed *inside* the encoder::

    waveform (B, T) --HuBERT [+ prefix / adapter / LoRA / BitFit / S3-Router mask]--> L+1 hidden states (B, F, D)
        --WeightedLayerSum (softmax weights, optional per-state LayerNorm)--> (B, F, D)
        --head--> classification: mean over valid frames, Linear(D, C)      (accuracy)
                  ctc:            Linear(D, characters + blank), greedy CTC  (WER, CER)

What trains is chosen by ``method.name``, from the same registry as ``speechprompt train``: ``prefix``,
``adapter``, ``lora``, ``bitfit``, ``mask``, or the two baselines, ``linear_probe`` (the upstream is frozen and
untouched: only the layer weights and the head train; SUPERB's own protocol) and ``full_finetune`` (every
upstream parameter trains too). ``prompt`` is refused: it is an input of the unit LM, not of HuBERT. The layer
weights and the head always train. SUPERB's ASR head is a 2-layer BiLSTM; a linear CTC head keeps the comparison
about the upstream and its tuning method.

The run directory receives::

    config.yaml               the resolved config
    log.csv                   step, metric, value (train loss, learning rate, dev metrics)
    learning_curves.png       train loss and dev metrics against the step
    best.safetensors/.json    the task checkpoint: the method's exported tensors under ``method.*``, the layer
                              weights and head under ``head.*``, nothing of the frozen upstream
    train_state.pt            trainable tensors, optimizer, scheduler, RNG and loop state, saved every
                              ``eval_every`` updates: a killed run resumes from here (resume=true)
    metrics.json              dev metrics of the best checkpoint, parameter counts, layer weights, checkpoint bytes

The sidecar records the upstream's path and fingerprint (sha256 of its state dict); :func:`load_superb` refuses
any other upstream. Runs are reproducible: the seed fixes initialisation, the batch order (epoch ``e`` is shuffled
with ``seed + e``) and dropout, and a resumed run ends with the same tensors as one that was never interrupted
(bitwise on CPU). A finished run started again reports its metrics without training; raising ``max_steps`` (or
``patience``) continues it, unless the learning-rate schedule depends on ``max_steps`` (cosine past its warmup).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import speechprompt.baselines  # noqa: F401  (registers the linear_probe and full_finetune methods)
from speechprompt import config as C
from speechprompt.audio import load_audio
from speechprompt.checkpoint import base_fingerprint, load_checkpoint, load_into, save_checkpoint
from speechprompt.config import ConfigError, option
from speechprompt.data_prep.manifest import ManifestError, labels_path, read_labels, read_manifest
from speechprompt.devices import resolve_device, torch_threads
from speechprompt.errors import AudioError, CheckpointError
from speechprompt.fileio import torch_save, write_json
from speechprompt.models.hubert import HubertModel, load_hubert, normalize_waveform
from speechprompt.rng import rng_state, set_rng_state
from speechprompt.schedule import build_scheduler, lr_at
from speechprompt.tasks.ctc import CharVocabulary, CTCError, ctc_loss, greedy_decode, normalize_text
from speechprompt.tasks.metrics import accuracy, cer, wer
from speechprompt.train import STATE_FILE, MethodConfig, OptimConfig
from speechprompt.tuning import (
    TuningMethod,
    build_method,
    count_parameters,
    freeze_except,
    method_config,
    method_name,
)

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "best"
TASK_TYPE = "superb"
STATE_FORMAT = 1  # of train_state.pt

# --------------------------------------------------------------------------------------------------------------
# The model


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

    def loss(self, output: Tensor, frame_mask: Tensor, refs: Sequence[str]) -> Tensor:
        """Cross-entropy; a label outside the training classes (dev only) is ignored."""
        targets = torch.tensor([self._index.get(r, -1) for r in refs], device=output.device)
        return F.cross_entropy(output, targets, ignore_index=-1)

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

    def loss(self, output: Tensor, frame_mask: Tensor, refs: Sequence[str]) -> Tensor:
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
    """A (tuned) HuBERT upstream, the weighted layer sum and a head.

    Args:
        upstream: the HuBERT model, with ``method`` attached to it.
        method: the tuning method (its :meth:`~TuningMethod.forward_kwargs` go to the upstream).
        featurizer: the weighted sum over ``upstream.num_layers + 1`` hidden states.
        head: a :class:`ClassificationHead` or :class:`CTCHead`.
        task_cfg: the upstream checkpoint's task config (whether waveforms are normalised).
        upstream_dropout: keep the upstream's dropout active in training mode (off: the upstream always runs in
            eval mode, as SUPERB does for a frozen upstream).

    Shapes: ``forward(wav (B, T), padding_mask (B, T))`` gives the head's output and the ``(B, F)`` frame padding
    mask (True at padding).
    """

    def __init__(self, upstream: HubertModel, method: TuningMethod, featurizer: WeightedLayerSum, head: nn.Module,
                 task_cfg: dict[str, Any], upstream_dropout: bool = False) -> None:
        super().__init__()
        self.upstream, self.method, self.featurizer, self.head = upstream, method, featurizer, head
        self.task_cfg = dict(task_cfg)
        self.upstream_dropout = upstream_dropout

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


def _check_method(name: str) -> None:
    if name == "prompt":
        raise ConfigError("method.name=prompt tunes the unit LM's input; on HuBERT use prefix (deep key/value "
                          "prefixes), adapter, lora, bitfit, mask, linear_probe (frozen) or full_finetune")


def _load_upstream(path: str | os.PathLike) -> tuple[HubertModel, dict[str, Any], str]:
    """Load HuBERT, fingerprint its state dict as stored, and drop the pretraining heads (never used here)."""
    if not Path(path).is_file():
        raise CheckpointError(f"upstream HuBERT checkpoint {path} does not exist")
    upstream, task_cfg = load_hubert(path)
    fingerprint = base_fingerprint(upstream)
    upstream.remove_pretraining_modules()
    return upstream, task_cfg, fingerprint


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
        upstream_path: a fairseq HuBERT checkpoint.
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
    _check_method(method_name(config))
    upstream, task_cfg, fingerprint = _load_upstream(upstream_path)
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
        upstream: the HuBERT checkpoint (default: the path recorded at training time, as given, else absolute).
        device: where the model goes.

    Raises:
        CheckpointError: not a SUPERB checkpoint, or an upstream whose fingerprint differs from the one trained on.
    """
    ckpt = load_checkpoint(path)
    meta = ckpt.meta
    if meta.get("task", {}).get("type") != TASK_TYPE:
        kind = meta.get("task", {}).get("type")
        raise CheckpointError(f"{ckpt.path} is not a SUPERB checkpoint (its task type is {kind!r})")
    upstream_path = upstream or meta["base"]["path"]
    if upstream is None and not Path(upstream_path).is_file():  # recorded relative to another working directory
        upstream_path = meta["base"].get("path_absolute", upstream_path)
    model, task_cfg, fingerprint = _load_upstream(upstream_path)
    ckpt.check_base(fingerprint, upstream_path)
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


# --------------------------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass
class AudioSplit:
    """Audio paths and their labels (or transcripts), line-aligned.

    ``unreadable`` fills up as files fail to load (row -> why): they are left out of batches, reported once, and
    every later pass skips them too.
    """

    paths: list[Path]
    labels: list[str]
    unreadable: dict[int, str] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)


def load_audio_split(manifest: str | os.PathLike, labels: str | os.PathLike | None = None) -> AudioSplit:
    """A manifest and its labels (default: the ``.labels`` sidecar beside it).

    Raises:
        ManifestError: an unreadable manifest or label file, or counts that differ.
    """
    m = read_manifest(manifest)
    labels_file = labels if labels is not None else labels_path(manifest)
    label_lines = read_labels(labels_file)
    if len(label_lines) != len(m):
        raise ManifestError(f"{labels_file} has {len(label_lines)} lines but {manifest} has {len(m)} rows")
    if not len(m):
        raise ManifestError(f"{manifest} has no rows")
    return AudioSplit(m.paths(), label_lines)


def audio_batches(split: AudioSplit, batch_size: int, shuffle: bool = False, seed: int = 0,
                  start: int = 0) -> Iterator[tuple[list[np.ndarray], list[str]]]:
    """Batches of ``(waveforms, labels)``, read with :func:`~speechprompt.audio.load_audio` as they are needed.

    With ``shuffle``, the order is a permutation drawn from ``seed`` (pass ``seed + epoch`` for a new order per
    epoch that a rerun reproduces). ``start`` skips that many batches without reading their audio (a resumed
    run skips the batches it already took in its epoch).

    A file that fails to load (corrupt, empty, silent, ...) is logged, recorded in ``split.unreadable`` and left
    out of its batch, so one bad file does not end a long run; a batch with no readable file is not yielded.
    """
    order = np.random.default_rng(seed).permutation(len(split)) if shuffle else np.arange(len(split))
    for first in range(start * batch_size, len(order), batch_size):
        wavs, labels = [], []
        for i in order[first : first + batch_size].tolist():
            if i in split.unreadable:
                continue
            try:
                wavs.append(load_audio(split.paths[i]))
            except AudioError as e:
                split.unreadable[i] = str(e)
                logger.warning("skipping row %d: %s", i, e)
                continue
            labels.append(split.labels[i])
        if wavs:
            yield wavs, labels


# --------------------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass
class SuperbDataConfig:
    """Audio manifests (fairseq TSV) with line-aligned labels or transcripts."""

    train_manifest: str = option(help="training manifest (root line, then relpath<TAB>num_samples)")
    train_labels: str | None = option(None, help="training labels (null: the manifest's .labels sidecar)")
    dev_manifest: str | None = option(None, help="dev manifest for model selection and early stopping")
    dev_labels: str | None = option(None, help="dev labels (null: the dev manifest's .labels sidecar)")

    def __post_init__(self) -> None:
        if self.dev_labels is not None and self.dev_manifest is None:
            raise ConfigError("data.dev_labels needs data.dev_manifest")


@dataclasses.dataclass
class SuperbConfig:
    """A SUPERB-style run on a HuBERT upstream."""

    data: SuperbDataConfig = option(help="audio and labels")
    upstream: str = option(help="the HuBERT checkpoint (fairseq .pt), frozen except for what the method trains")
    head: HeadKind = option(HeadKind.CLASSIFICATION, help="classification (mean-pool + linear; accuracy) or ctc "
                            "(characters; WER/CER)")
    method: MethodConfig = option(
        help="what trains inside the upstream: prefix | adapter | lora | bitfit | mask | linear_probe (frozen "
        "upstream) | full_finetune", default_factory=lambda: MethodConfig(name="linear_probe"))
    optim: OptimConfig = option(help="optimizer (one learning rate for the method, layer weights and head)",
                                default_factory=lambda: OptimConfig(lr=1e-3))
    layer_norm: bool = option(False, help="LayerNorm each hidden state before the weighted sum")
    upstream_dropout: bool = option(False, help="keep the upstream's dropout active while training")
    run_dir: str = option("exp/superb", help="where the run's files go")
    batch_size: int = option(8, help="utterances per update")
    max_steps: int = option(1000, help="updates at most")
    eval_every: int = option(100, help="evaluate on dev, keep the best checkpoint and save the training state "
                             "every N updates")
    patience: int = option(0, help="stop after this many evaluations without a better dev metric (0: never)")
    eval_batch_size: int = option(16, help="utterances per batch when evaluating")
    seed: int = option(0, help="seed of initialisation and shuffling")
    device: str = option("auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    threads: int = option(0, help="CPU threads of torch ops (0: torch's default)")
    log_every: int = option(10, help="log the train loss every N updates")
    resume: bool = option(True, help="continue from run_dir/train_state.pt if it is there; false refuses a run_dir "
                          "that has one")

    def __post_init__(self) -> None:
        _check_method(self.method.name)
        for name in ("batch_size", "max_steps", "eval_every", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.patience < 0:
            raise ConfigError(f"patience must be >= 0, got {self.patience}")


# --------------------------------------------------------------------------------------------------------------
# Training and evaluation


@torch.no_grad()
def evaluate_superb(model: SuperbModel, split: AudioSplit, batch_size: int = 16) -> tuple[dict[str, float], list[str]]:
    """Metrics and predictions of ``model`` on ``split`` (the model is put in eval mode).

    Returns:
        ``{"loss", "accuracy"}`` or ``{"loss", "wer", "cer"}`` (the loss skips what the head cannot encode) over
        the readable utterances, plus ``n`` (how many) and ``unreadable`` (how many were skipped, see
        :func:`audio_batches`); and one prediction per utterance in order, ``None`` for an unreadable one.

    Raises:
        AudioError: not one file of the split could be read.
    """
    model.eval()
    hyps: list[str] = []
    loss_sum, loss_count = 0.0, 0
    for wavs, refs in audio_batches(split, batch_size):
        output, frame_mask = model(*model.prepare(wavs))
        hyps.extend(model.head.decode(output, frame_mask))
        try:
            loss_sum += float(model.head.loss(output, frame_mask, refs)) * len(refs)
            loss_count += len(refs)
        except CTCError:  # a dev transcript with characters unseen in training: it still counts in WER/CER
            continue
    readable = [i for i in range(len(split)) if i not in split.unreadable]
    if not readable:
        raise AudioError(split.paths[0], f"no file of the split could be read ({len(split)} tried)")
    metrics = model.head.metrics([split.labels[i] for i in readable], hyps)
    metrics["loss"] = loss_sum / loss_count if loss_count else float("nan")
    metrics["n"], metrics["unreadable"] = len(readable), len(split.unreadable)
    in_order: list[str | None] = [None] * len(split)
    for i, hyp in zip(readable, hyps):
        in_order[i] = hyp
    return metrics, in_order


def _better(value: float, best: float | None, higher: bool) -> bool:
    if math.isnan(value):
        return False
    return best is None or (value > best if higher else value < best)


def train_superb(cfg: SuperbConfig) -> dict[str, Any]:
    """Train (or resume), keep the checkpoint with the best dev metric (the last one without dev); returns
    ``metrics.json``."""
    return fit_superb(cfg)[1]


def fit_superb(cfg: SuperbConfig) -> tuple[SuperbModel, dict[str, Any]]:
    """:func:`train_superb`, also returning the model as it is after the last update (not reloaded)."""
    with torch_threads(cfg.threads):
        return _train(cfg)


# Config keys that may differ between a killed run and its resumption: none changes what an update computes
# (max_steps is checked against the learning-rate schedule in _check_resumable).
_RESUMABLE_CHANGES = {"threads", "resume", "device", "run_dir", "log_every", "eval_batch_size", "patience", "max_steps"}


@dataclasses.dataclass
class _Progress:
    """Where the training loop is: with the tensors, optimizer, scheduler and RNG, all that a resumed run needs."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of this epoch already taken
    best: float | None = None  # the best dev value of the selection metric so far
    best_step: int = 0
    best_metrics: dict[str, float] | None = None
    evals_since_best: int = 0
    seconds: float = 0.0  # training time of all sessions so far

    def done(self, cfg: SuperbConfig) -> bool:
        """Whether the loop stops here: ``max_steps`` reached, or ``patience`` evaluations without improvement."""
        return self.step >= cfg.max_steps or (cfg.patience > 0 and self.evals_since_best >= cfg.patience)


def _check_resumable(saved: dict[str, Any], cfg: SuperbConfig, step: int, path: Path) -> None:
    """Refuse to resume with a config that changes what the run computes.

    Raises:
        ConfigError: a key outside :data:`_RESUMABLE_CHANGES` differs, or a new ``max_steps`` changes the learning
            rate of an update already taken (a schedule that decays over ``max_steps``).
    """
    changed = C.first_difference(saved, C.to_dict(cfg), _RESUMABLE_CHANGES)
    if changed is not None:
        key, a, b = changed
        raise ConfigError(f"{path} was saved by a run with {key}={a!r}, but this config has {b!r}; use another "
                          "run_dir, or move the file away to start over")
    o = cfg.optim
    if any(lr_at(o.schedule, s, o.lr, o.warmup_steps, saved["max_steps"])
           != lr_at(o.schedule, s, o.lr, o.warmup_steps, cfg.max_steps) for s in range(step)):
        raise ConfigError(f"{path}: max_steps={cfg.max_steps} instead of {saved['max_steps']} changes the learning "
                          f"rate of updates already taken (optim.schedule={o.schedule} decays over max_steps); keep "
                          "max_steps, or use another run_dir")


def _load_state(cfg: SuperbConfig, path: Path) -> dict[str, Any] | None:
    """The training state to resume from (``None``: start afresh).

    Raises:
        ConfigError: ``resume=false`` and ``path`` exists, or a config the state cannot be resumed with.
        CheckpointError: ``path`` is unreadable or not a SUPERB training state.
    """
    if not path.is_file():
        return None
    if not cfg.resume:
        raise ConfigError(f"{path} holds an earlier run's training state and resume=false: use another run_dir, "
                          "resume=true to continue that run, or move the file away to start over")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever makes it unreadable, the user's fix is the same
        raise CheckpointError(f"{path}: unreadable training state ({e}); move it away to start over") from None
    if not isinstance(state, dict) or (state.get("type"), state.get("format")) != (TASK_TYPE, STATE_FORMAT):
        raise CheckpointError(f"{path} is not a SUPERB training state (format {STATE_FORMAT}); use another run_dir")
    _check_resumable(state["config"], cfg, state["progress"]["step"], path)
    return state


def _trainable_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters by name (call after :meth:`SuperbModel.trainable_parameters` froze the rest)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _restore(model: SuperbModel, optimizer: torch.optim.Optimizer, scheduler: Any, state: dict[str, Any],
             path: Path) -> _Progress:
    """Put the saved tensors, optimizer, scheduler and RNG state back; returns the loop's progress."""
    params = _trainable_tensors(model)
    if set(params) != set(state["trainable"]):
        raise CheckpointError(f"{path}: its trainable tensors are not this model's; use another run_dir")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["trainable"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])  # last: building the model above drew from the RNG
    return _Progress(**state["progress"])


def _train(cfg: SuperbConfig) -> tuple[SuperbModel, dict[str, Any]]:
    from speechprompt.plots import plot_learning_curves
    from speechprompt.runlog import RunLogger

    run_dir = Path(cfg.run_dir)
    state_path = run_dir / STATE_FILE
    saved = _load_state(cfg, state_path)
    run_dir.mkdir(parents=True, exist_ok=True)
    C.save_config(cfg, run_dir / "config.yaml")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    train_split = load_audio_split(cfg.data.train_manifest, cfg.data.train_labels)
    dev_split = load_audio_split(cfg.data.dev_manifest, cfg.data.dev_labels) if cfg.data.dev_manifest else None
    model, fingerprint = build_superb(cfg.upstream, cfg.method.resolved(), cfg.head, train_split.labels,
                                      cfg.layer_norm, cfg.upstream_dropout, device)
    params = model.trainable_parameters()
    n_trainable = sum(p.numel() for p in params)
    n_method = count_parameters(model.method)
    logger.info("method %s: %d trainable parameters (%d in the upstream)", cfg.method.name, n_trainable, n_method)

    opt_cls = torch.optim.AdamW if cfg.optim.weight_decay > 0 else torch.optim.Adam
    optimizer = opt_cls(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                        weight_decay=cfg.optim.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.optim.schedule, cfg.optim.warmup_steps, cfg.max_steps)
    progress = _Progress()
    if saved is not None:
        if saved["fingerprint"] != fingerprint:
            raise CheckpointError(f"{state_path} was trained on an upstream with fingerprint {saved['fingerprint']}, "
                                  f"but {cfg.upstream} has {fingerprint}; use another run_dir")
        progress = _restore(model, optimizer, scheduler, saved, state_path)
        if saved["summary"] is not None and progress.done(cfg):
            logger.info("%s: the run already finished at step %d; nothing to do", run_dir, progress.step)
            return model.eval(), saved["summary"]
        logger.info("resuming %s at step %d (epoch %d)", run_dir, progress.step, progress.epoch)

    selected = f"dev.{model.head.default_metric}" if dev_split else None
    meta = {
        "task": {"type": TASK_TYPE, **model.head.describe()},
        "method": {"name": cfg.method.name, "config": C.to_dict(cfg.method.resolved())},
        "head": f"superb_{HeadKind(cfg.head).value}",
        "verbalizer": None,
        "base": {"path": str(cfg.upstream), "path_absolute": str(Path(cfg.upstream).resolve()),
                 "fingerprint": fingerprint, "kind": "hubert"},
        "superb": {"head": HeadKind(cfg.head).value, "layer_norm": cfg.layer_norm,
                   "upstream_dropout": cfg.upstream_dropout},
    }

    def save(step: int, metrics: dict[str, float] | None) -> Path:
        training = {"step": step, "trainable_parameters": n_trainable, "method_parameters": n_method,
                    "seed": cfg.seed, "selected_on": selected, "metrics": metrics}
        return save_checkpoint(run_dir / CHECKPOINT_NAME, model.method.export_state_dict(),
                               model.head_state_dict(), {**meta, "training": training})

    session_start, seconds_before = time.perf_counter(), progress.seconds

    def save_state(summary: dict[str, Any] | None = None) -> None:
        """``train_state.pt``, written after the best checkpoint: its atomic rename commits the step."""
        progress.seconds = seconds_before + time.perf_counter() - session_start
        torch_save({
            "type": TASK_TYPE, "format": STATE_FORMAT, "config": C.to_dict(cfg), "fingerprint": fingerprint,
            "progress": dataclasses.asdict(progress), "summary": summary,
            "trainable": {k: v.detach().cpu() for k, v in _trainable_tensors(model).items()},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
        }, state_path)

    # A resumed run drops what the killed one logged after its saved step: those steps are taken again.
    with RunLogger(run_dir, resume_from=progress.step, tensorboard=False) as log:
        while not progress.done(cfg):
            model.train()
            for wavs, refs in audio_batches(train_split, cfg.batch_size, shuffle=True, seed=cfg.seed + progress.epoch,
                                            start=progress.batch_in_epoch):
                output, frame_mask = model(*model.prepare(wavs))
                loss = model.head.loss(output, frame_mask, refs)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.optim.clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip)
                optimizer.step()
                scheduler.step()
                progress.step += 1
                progress.batch_in_epoch += 1
                step = progress.step
                if step % cfg.log_every == 0:
                    log.log(step, train_loss=loss.item(), lr=scheduler.get_last_lr()[0])
                if step % cfg.eval_every == 0 or step == cfg.max_steps:
                    if dev_split is not None:
                        metrics, _ = evaluate_superb(model, dev_split, cfg.eval_batch_size)
                        log.log(step, **{f"dev_{k}": v for k, v in metrics.items()})
                        model.train()
                        value = metrics[model.head.default_metric]
                        if _better(value, progress.best, model.head.higher_is_better):
                            progress.best, progress.best_metrics, progress.best_step = value, metrics, step
                            progress.evals_since_best = 0
                            save(step, metrics)
                        else:
                            progress.evals_since_best += 1
                    save_state()
                if progress.done(cfg):
                    break
            else:  # the epoch ran out (a break leaves it unfinished: a longer resumed run continues it)
                progress.epoch += 1
                progress.batch_in_epoch = 0
    if dev_split is None or progress.best_metrics is None:
        progress.best_step = progress.step
        save(progress.step, None)
    path = run_dir / f"{CHECKPOINT_NAME}.safetensors"
    summary = {
        "method": cfg.method.name,
        "head": HeadKind(cfg.head).value,
        "steps": progress.step,
        "best_step": progress.best_step,
        "seconds": round(seconds_before + time.perf_counter() - session_start, 3),
        "trainable_parameters": n_trainable,
        "method_parameters": n_method,
        "layer_weights": model.featurizer.normalized_weights().tolist(),
        "checkpoint": str(path),
        "checkpoint_bytes": path.stat().st_size,
        "dev": progress.best_metrics,
    }
    write_json(run_dir / "metrics.json", summary)
    try:
        plot_learning_curves(run_dir / "log.csv", run_dir / "learning_curves.png",
                             title=f"SUPERB {HeadKind(cfg.head).value}: {cfg.method.name}")
    except Exception as e:  # a plot must never fail a finished run
        logger.warning("no learning-curve plot: %s", e)
    save_state(summary)
    return model.eval(), summary


# --------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config (keys below)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-4")
    parser.epilog = "config keys:\n" + C.describe(SuperbConfig)


def run(args: argparse.Namespace) -> int:
    cfg = C.load_config(SuperbConfig, args.config, args.overrides)
    print(json.dumps(train_superb(cfg)))
    return 0
