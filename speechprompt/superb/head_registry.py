"""SUPERB heads by name: each registered with its options dataclass and the encoder features it reads.

A head is an ``nn.Module`` that turns features ``(B, F, D)`` and their frame padding mask ``(B, F)`` (True at
padding) into an output, and owns everything task-specific about it::

    head = build_head("utterance", dim=768, train_labels=labels, options={"projector_dim": 256})
    output = head(features, frame_mask)                    # (B, C) logits, (B, F, V) log-probabilities ...
    loss_sum, terms = head.loss(output, frame_mask, refs)  # summed loss and its number of terms
    hyps = head.decode(output, frame_mask)                 # one string per utterance
    head.metrics(refs, hyps)                               # {"accuracy": ...} or {"wer": ..., "cer": ...}

and the attributes ``default_metric`` (what dev selection and early stopping watch), ``higher_is_better``,
``decoder`` (the name predictions are reported under: ``argmax`` or ``greedy``), ``labels`` (the classes, for a
confusion matrix; ``None`` when there is no fixed class list), and ``describe()`` (what the checkpoint sidecar stores
to rebuild the head, with ``from_meta``).

What the head reads is part of its registration (:class:`Features`): SUPERB's learned weighted sum of every hidden
state, or the encoder's final output (fairseq's CTC fine-tuning and AST's classifier read that).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from speechprompt.config import ConfigError, from_dict, to_dict


class Features(str, enum.Enum):
    """Which encoder output a head reads."""

    WEIGHTED_SUM = "weighted_sum"  # SUPERB's softmax-weighted sum of the L+1 hidden states
    FINAL = "final"  # the encoder's output: last layer (+ final LayerNorm in pre-LN encoders)


@dataclass(frozen=True)
class HeadSpec:
    """A registered head.

    Attributes:
        name: the name in configs (``head: utterance``).
        options: the options dataclass (``head_options:`` in configs), checked strictly.
        head_cls: the module, with ``from_train_labels(dim, labels, options)`` and ``from_meta(dim, meta,
            options)`` class methods.
        features: what it reads from the encoder.
        summary: one line for ``--help``.
    """

    name: str
    options: type
    head_cls: type[nn.Module]
    features: Features
    summary: str


HEADS: dict[str, HeadSpec] = {}


def register_head(name: str, options: type, features: Features = Features.WEIGHTED_SUM,
                  summary: str = "") -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Register a head class under ``name`` (a class may be registered under several names with other options)."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in HEADS:
            raise ValueError(f"SUPERB head {name!r} is registered twice")
        if not dataclasses.is_dataclass(options):
            raise TypeError(f"options of head {name!r} must be a dataclass")
        HEADS[name] = HeadSpec(name, options, cls, Features(features), summary or (cls.__doc__ or "").split("\n")[0])
        return cls

    return wrap


def head_spec(name: str) -> HeadSpec:
    """The head registered as ``name``; a :class:`ConfigError` naming the known ones otherwise."""
    try:
        return HEADS[name]
    except KeyError:
        raise ConfigError(f"unknown SUPERB head {name!r}; known: {', '.join(HEADS)}") from None


def head_options(name: str, options: dict[str, Any] | None = None) -> Any:
    """The options dataclass of head ``name`` from a mapping (unknown keys and wrong types are errors)."""
    return from_dict(head_spec(name).options, dict(options or {}), where=f"head_options ({name})")


def build_head(name: str, dim: int, train_labels: Sequence[str], options: dict[str, Any] | None = None) -> nn.Module:
    """A fresh head for features of size ``dim``, sized from the training labels or transcripts."""
    spec = head_spec(name)
    return spec.head_cls.from_train_labels(dim, train_labels, head_options(name, options))


def rebuild_head(name: str, dim: int, meta: dict[str, Any], options: dict[str, Any] | None = None) -> nn.Module:
    """The head of a checkpoint, from what its ``describe()`` stored (``meta``) and its options."""
    spec = head_spec(name)
    return spec.head_cls.from_meta(dim, meta, head_options(name, options))


def describe_heads() -> str:
    """One line per head for ``--help``: name, what it reads, summary and its options with defaults."""
    lines = []
    for spec in HEADS.values():
        defaults = to_dict(spec.options())
        opts = f" (options: {', '.join(f'{k}={v}' for k, v in defaults.items())})" if defaults else ""
        lines.append(f"  {spec.name} [{spec.features.value}]: {spec.summary}{opts}")
    return "\n".join(lines)
