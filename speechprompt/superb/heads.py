"""Utterance-level SUPERB heads: one label per utterance (KS, SID, ER, ESC-50) or one per slot (IC).

========================  ==============  ==================================================================
head                      features        what
========================  ==============  ==================================================================
``classification``        weighted sum    mean over valid frames, ``Linear(D, C)`` (the toolkit's linear probe)
``utterance``             weighted sum    s3prl's ``UtteranceLevel``: ``Linear(D, 256)`` per frame, mean over
                                          valid frames, ``Linear(256, C)`` (SUPERB KS, SID, ER)
``multislot``             weighted sum    s3prl's IC head: the same with ``Linear(256, sum of slot sizes)``,
                                          one cross-entropy per slot; accuracy = every slot right
``ast``                   final output    AST's classifier: mean of the class and distillation tokens,
                                          LayerNorm, ``Linear(D, C)`` (AAT on ESC-50 / Speech Commands)
========================  ==============  ==================================================================

The s3prl heads project every frame before pooling (the same value as pooling first, since both are linear; it is
written in s3prl's order). A label outside the training classes (a dev or test label never seen in training) is
left out of the loss and counted wrong by the metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechprompt.config import ConfigError, option
from speechprompt.superb.head_registry import Features, register_head
from speechprompt.tasks.metrics import accuracy


def mean_pool(x: Tensor, frame_mask: Tensor) -> Tensor:
    """The mean over the valid frames of each utterance: ``(B, F, D)`` and mask ``(B, F)`` (True at padding) ->
    ``(B, D)``."""
    valid = (~frame_mask)[..., None].to(x.dtype)  # (B, F, 1)
    return (x * valid).sum(1) / valid.sum(1).clamp(min=1)


def _classes(labels: Sequence[str], what: str = "classification") -> list[str]:
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ConfigError(f"{what} needs at least 2 classes in the training labels, got {classes}")
    return classes


def _cross_entropy(logits: Tensor, index: dict[str, int], refs: Sequence[str]) -> tuple[Tensor, int]:
    """Summed cross-entropy over the utterances whose label is a known class, and how many those are."""
    targets = torch.tensor([index.get(r, -1) for r in refs], device=logits.device)
    return F.cross_entropy(logits.float(), targets, ignore_index=-1, reduction="sum"), int(targets.ge(0).sum())


@dataclass
class ClassificationOptions:
    """The linear head: nothing to choose (``utterance`` adds s3prl's projector)."""


@dataclass
class UtteranceOptions:
    """s3prl's ``UtteranceLevel`` head (``modelrc`` of speech_commands, voxceleb1, emotion)."""

    projector_dim: int = option(256, help="width of the per-frame projector before pooling (s3prl: 256)")

    def __post_init__(self) -> None:
        if self.projector_dim < 1:
            raise ConfigError(f"projector_dim must be >= 1, got {self.projector_dim}")


@register_head("classification", ClassificationOptions, summary="mean over valid frames, Linear(D, C); accuracy")
@register_head("utterance", UtteranceOptions,
               summary="s3prl UtteranceLevel: Linear(D, P) per frame, mean pooling, Linear(P, C); accuracy")
class ClassificationHead(nn.Module):
    """One class per utterance: an optional per-frame projector, the mean over valid frames, a linear layer.

    Args:
        dim: feature size ``D``.
        labels: the classes in index order.
        projector_dim: ``P``, the width of s3prl's projector ``Linear(D, P)``; 0: none (pool ``D`` directly).

    Shapes: features ``(B, F, D)`` and frame padding mask ``(B, F)`` in; logits ``(B, C)`` out.
    """

    default_metric = "accuracy"
    higher_is_better = True
    decoder = "argmax"

    def __init__(self, dim: int, labels: Sequence[str], projector_dim: int = 0) -> None:
        super().__init__()
        self.labels = list(labels)
        self._index = {label: i for i, label in enumerate(self.labels)}
        self.projector = nn.Linear(dim, projector_dim) if projector_dim else None
        self.proj = nn.Linear(projector_dim or dim, len(self.labels))

    @classmethod
    def from_train_labels(cls, dim: int, labels: Sequence[str],
                          options: UtteranceOptions | ClassificationOptions | None = None) -> ClassificationHead:
        """Classes = the sorted distinct training labels."""
        return cls(dim, _classes(labels), getattr(options, "projector_dim", 0))

    @classmethod
    def from_meta(cls, dim: int, meta: dict[str, Any],
                  options: UtteranceOptions | ClassificationOptions | None = None) -> ClassificationHead:
        return cls(dim, meta["labels"], getattr(options, "projector_dim", 0))

    def describe(self) -> dict[str, Any]:
        """What the sidecar stores to rebuild this head."""
        return {"labels": self.labels}

    def forward(self, features: Tensor, frame_mask: Tensor) -> Tensor:
        if self.projector is not None:
            features = self.projector(features)  # (B, F, P)
        return self.proj(mean_pool(features, frame_mask))  # (B, C)

    def loss(self, output: Tensor, frame_mask: Tensor, refs: Sequence[str]) -> tuple[Tensor, int]:
        """Summed cross-entropy and its number of terms."""
        return _cross_entropy(output, self._index, refs)

    def decode(self, output: Tensor, frame_mask: Tensor) -> list[str]:
        return [self.labels[i] for i in output.argmax(dim=-1).tolist()]

    def metrics(self, refs: Sequence[str], hyps: Sequence[str]) -> dict[str, float]:
        return {"accuracy": accuracy(refs, hyps)}


@dataclass
class MultiSlotOptions:
    """s3prl's Fluent Speech Commands head."""

    projector_dim: int = option(256, help="width of the per-frame projector before pooling (s3prl: 256)")
    separator: str = option("|", help="what joins the slots in a label (the FSC preparer writes action|object|"
                            "location)")

    def __post_init__(self) -> None:
        if self.projector_dim < 1 or not self.separator:
            raise ConfigError("projector_dim must be >= 1 and separator non-empty")


@register_head("multislot", MultiSlotOptions,
               summary="s3prl IC: Linear(D, P), mean pooling, one softmax per slot; accuracy = all slots right")
class MultiSlotHead(nn.Module):
    """Several classifications per utterance (FSC's action, object and location), from one pooled vector.

    The label ``action|object|location`` is split at the separator; each slot has the values seen in training (in
    sorted order) and its own slice of the output layer. The loss is the sum over slots of their cross-entropies
    (s3prl's IC objective); ``accuracy`` counts an utterance right only when every slot is, and
    ``slot_accuracy`` is the mean over slots of each slot's accuracy.

    Args:
        dim: feature size ``D``.
        slots: each slot's values in index order.
        projector_dim: ``P``.
        separator: what joins the slots in a label.

    Shapes: features ``(B, F, D)`` and mask ``(B, F)`` in; logits ``(B, sum of slot sizes)`` out.
    """

    default_metric = "accuracy"
    higher_is_better = True
    decoder = "argmax"
    labels = None  # combinations of slots: no fixed class list to draw a confusion matrix over

    def __init__(self, dim: int, slots: Sequence[Sequence[str]], projector_dim: int = 256,
                 separator: str = "|") -> None:
        super().__init__()
        self.slots = [list(values) for values in slots]
        self.separator = separator
        self._index = [{v: i for i, v in enumerate(values)} for values in self.slots]
        self.projector = nn.Linear(dim, projector_dim)
        self.proj = nn.Linear(projector_dim, sum(len(v) for v in self.slots))

    @classmethod
    def from_train_labels(cls, dim: int, labels: Sequence[str], options: MultiSlotOptions) -> MultiSlotHead:
        """Slots and their values from the training labels, which must all have the same number of slots."""
        split = [label.split(options.separator) for label in labels]
        widths = {len(parts) for parts in split}
        if len(widths) != 1:
            raise ConfigError(f"multislot labels must all have the same number of {options.separator!r}-separated "
                              f"slots; the training labels have {sorted(widths)}")
        slots = [sorted({parts[k] for parts in split}) for k in range(widths.pop())]
        return cls(dim, slots, options.projector_dim, options.separator)

    @classmethod
    def from_meta(cls, dim: int, meta: dict[str, Any], options: MultiSlotOptions) -> MultiSlotHead:
        return cls(dim, meta["slots"], options.projector_dim, options.separator)

    def describe(self) -> dict[str, Any]:
        return {"slots": self.slots}

    def _slices(self, output: Tensor) -> list[Tensor]:
        """The logits of each slot, ``(B, values of the slot)``."""
        return list(torch.split(output, [len(v) for v in self.slots], dim=-1))

    def forward(self, features: Tensor, frame_mask: Tensor) -> Tensor:
        return self.proj(mean_pool(self.projector(features), frame_mask))  # (B, sum of slot sizes)

    def loss(self, output: Tensor, frame_mask: Tensor, refs: Sequence[str]) -> tuple[Tensor, int]:
        """The sum over slots of each slot's summed cross-entropy, and the number of utterances.

        A label with the wrong number of slots raises (the data are wrong); a slot value unseen in training is
        left out of that slot's term.
        """
        parts = [self._split(r) for r in refs]
        total = output.new_zeros((), dtype=torch.float32)
        for k, logits in enumerate(self._slices(output)):
            slot_sum, _ = _cross_entropy(logits, self._index[k], [p[k] for p in parts])
            total = total + slot_sum
        return total, len(refs)

    def _split(self, label: str) -> list[str]:
        parts = label.split(self.separator)
        if len(parts) != len(self.slots):
            raise ConfigError(f"label {label!r} has {len(parts)} slots; the head was trained on {len(self.slots)}")
        return parts

    def decode(self, output: Tensor, frame_mask: Tensor) -> list[str]:
        best = [logits.argmax(dim=-1).tolist() for logits in self._slices(output)]  # slots x B
        return [self.separator.join(self.slots[k][best[k][b]] for k in range(len(self.slots)))
                for b in range(output.shape[0])]

    def metrics(self, refs: Sequence[str], hyps: Sequence[str]) -> dict[str, float]:
        n = len(self.slots)
        ref_parts = [r.split(self.separator) for r in refs]
        hyp_parts = [h.split(self.separator) for h in hyps]
        per_slot = [accuracy([r[k] if len(r) == n else None for r in ref_parts], [h[k] for h in hyp_parts])
                    for k in range(n)]
        return {"accuracy": accuracy(refs, hyps), "slot_accuracy": sum(per_slot) / n}


@dataclass
class ASTHeadOptions:
    """AST's own classifier (``ASTForAudioClassification``): nothing to choose."""

    layer_norm_eps: float = option(1e-12, help="epsilon of the head's LayerNorm (AST: 1e-12)")


@register_head("ast", ASTHeadOptions, features=Features.FINAL,
               summary="AST classifier: mean of the class and distillation tokens, LayerNorm, Linear(D, C)")
class ASTHead(nn.Module):
    """AST's classification head on the final output: ``LayerNorm((t_cls + t_dist) / 2)``, then ``Linear(D, C)``.

    Shapes: the final tokens ``(B, 2 + patches, D)`` (class token first, then distillation) and a mask in;
    logits ``(B, C)`` out.
    """

    default_metric = "accuracy"
    higher_is_better = True
    decoder = "argmax"

    def __init__(self, dim: int, labels: Sequence[str], layer_norm_eps: float = 1e-12) -> None:
        super().__init__()
        self.labels = list(labels)
        self._index = {label: i for i, label in enumerate(self.labels)}
        self.layernorm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.proj = nn.Linear(dim, len(self.labels))

    @classmethod
    def from_train_labels(cls, dim: int, labels: Sequence[str], options: ASTHeadOptions) -> ASTHead:
        return cls(dim, _classes(labels), options.layer_norm_eps)

    @classmethod
    def from_meta(cls, dim: int, meta: dict[str, Any], options: ASTHeadOptions) -> ASTHead:
        return cls(dim, meta["labels"], options.layer_norm_eps)

    def describe(self) -> dict[str, Any]:
        return {"labels": self.labels}

    def forward(self, features: Tensor, frame_mask: Tensor) -> Tensor:
        if features.shape[1] < 2:
            raise ValueError(f"the ast head needs the class and distillation tokens, got {features.shape[1]} tokens")
        pooled = (features[:, 0] + features[:, 1]) / 2  # (B, D)
        return self.proj(self.layernorm(pooled))  # (B, C)

    def loss(self, output: Tensor, frame_mask: Tensor, refs: Sequence[str]) -> tuple[Tensor, int]:
        return _cross_entropy(output, self._index, refs)

    def decode(self, output: Tensor, frame_mask: Tensor) -> list[str]:
        return [self.labels[i] for i in output.argmax(dim=-1).tolist()]

    def metrics(self, refs: Sequence[str], hyps: Sequence[str]) -> dict[str, float]:
        return {"accuracy": accuracy(refs, hyps)}
