"""What every verbalizer shares: the token layout, the error type, the registry and unit frequency ranking.

A verbalizer turns a task label into the unit tokens that the frozen unit LM is taught to emit after the
``<s>`` separator, and turns emitted tokens back into a label. Token ids follow the LM's
:class:`~speechprompt.models.unit_vocab.UnitVocab`: wherever a verbalizer takes ``n_units`` it also takes the LM's
vocabulary instead. A bare number means fairseq's GSLM dictionary (``<s>``=0, ``<pad>``=1, ``</s>``=2,
``<unk>``=3, then unit ``u`` is token ``u + 4``), the layout of every verbalizer file written before; files store
unit ids, never token ids, so the same map serves any LM with as many units.

Each kind registers a *builder* (fits the verbalizer from training data and a :class:`VerbalizerConfig`) and a
*loader* (rebuilds it from its :meth:`Verbalizer.to_dict`), so that adding a kind is one file and no ``if/elif``.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch

from speechprompt.config import option
from speechprompt.errors import SpeechPromptError
from speechprompt.models.unit_vocab import UnitVocab

BOS, PAD, EOS, UNK = 0, 1, 2, 3
NSPECIAL = 4  # unit u is token u + NSPECIAL
UNKNOWN_LABEL = "<unk>"  # what decode() returns for a token sequence that is no known label
FORMAT_VERSION = 1  # of to_dict(); bumped when a field changes meaning


class VerbalizerError(SpeechPromptError, ValueError):
    """A label, map, token sequence or vocabulary that does not fit the verbalizer."""


class VerbalizerKind(str, enum.Enum):
    FREQ = "freq"
    RANDOM = "random"
    MAP = "map"
    LEARNABLE = "learnable"
    SEQUENCE = "sequence"


@dataclasses.dataclass
class VerbalizerConfig:
    """How labels become unit tokens. Only the fields of the chosen ``kind`` are read."""

    kind: VerbalizerKind = option(
        VerbalizerKind.FREQ,
        help="freq: most frequent label -> most frequent unit; random: seeded random map; map: explicit JSON map "
        "(map_path); learnable: Linear(V, C) on the LM's vocabulary logits; sequence: sentencepiece pieces -> units",
    )
    seed: int = option(0, help="seed of the random map (kind=random)")
    map_path: str | None = option(
        None, help="JSON file {label: [unit ids]} for kind=map, or for learnable_init=map (see verbalizers/README.md)"
    )
    slot_separator: str | None = option(
        None,
        help="split each label into slots that get one token each, e.g. '|' for Fluent Speech Commands "
        "'action|object|location' (kinds freq and random)",
    )
    learnable_init: Literal["random", "freq", "map"] = option(
        "random",
        help="kind=learnable: 'random' (PyTorch's zero-mean uniform Linear init) or a fixed kind ('freq', 'map') "
        "whose one-hot rows make step 0 score classes exactly as that fixed verbalizer does",
    )
    sp_model_type: Literal["unigram", "bpe"] = option(
        "unigram", help="kind=sequence: sentencepiece model type, 'unigram' or 'bpe'"
    )
    sp_vocab_size: int | None = option(
        None, help="kind=sequence: number of pieces (at most the number of units; None: as many as units)"
    )
    user_symbols: list[str] = option(
        [], help="kind=sequence: symbols kept whole as single pieces, e.g. slot tags 'B-artist', 'E-artist'"
    )
    tag_pattern: str | None = option(
        None,
        help=r"kind=sequence: regex; every whitespace-separated word of the training text that matches it fully "
        r"becomes a user symbol (SUPERB SNIPS slot tags: '[BE]-\S+')",
    )

    def __post_init__(self) -> None:
        self.kind = VerbalizerKind(self.kind)
        if self.kind is VerbalizerKind.MAP and not self.map_path:
            raise ValueError("kind=map needs map_path")
        if self.learnable_init not in ("random", "freq", "map"):
            raise ValueError(f"learnable_init must be 'random', 'freq' or 'map', got {self.learnable_init!r}")
        if self.learnable_init == "map" and not self.map_path:
            raise ValueError("learnable_init=map needs map_path")
        if self.sp_model_type not in ("unigram", "bpe"):
            raise ValueError(f"sp_model_type must be 'unigram' or 'bpe', got {self.sp_model_type!r}")
        if self.sp_vocab_size is not None and self.sp_vocab_size < 1:
            raise ValueError(f"sp_vocab_size must be positive, got {self.sp_vocab_size}")
        if self.slot_separator == "":
            raise ValueError("slot_separator must be a non-empty string or null")


@runtime_checkable
class Verbalizer(Protocol):
    """The interface every kind implements."""

    kind: str
    n_units: int

    @property
    def labels(self) -> list[str]:
        """Class labels in class-index order (empty for sequence tasks, which have no closed label set)."""

    @property
    def target_length(self) -> int | None:
        """Tokens after ``<s>`` per label for classification; ``None`` for sequences."""

    def encode(self, label: str) -> list[int]:
        """Token ids that the LM is trained to emit after ``<s>`` for ``label``."""

    def decode(self, ids: Sequence[int]) -> str:
        """The label (or text) of emitted token ids."""

    def candidates(self) -> torch.Tensor:
        """``(C, L)`` token ids of every class, in :attr:`labels` order, for constrained scoring."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description from which :func:`verbalizer_from_dict` rebuilds this verbalizer."""

    def check_vocab(self, n_tokens: int) -> None:
        """Raise :class:`VerbalizerError` unless the model's dictionary has ``n_tokens`` = units + 4 tokens."""


Units = int | UnitVocab  # a number of units (GSLM's layout) or an LM's unit vocabulary
Builder = Callable[[VerbalizerConfig, Sequence[str], Sequence[Sequence[int]], Units], Verbalizer]
Loader = Callable[[dict[str, Any], UnitVocab | None], Verbalizer]


def as_vocab(units: Units) -> UnitVocab:
    """``units`` as a :class:`UnitVocab`: a number of units is GSLM's layout."""
    if isinstance(units, UnitVocab):
        return units
    if isinstance(units, bool) or not isinstance(units, int) or units < 1:
        raise VerbalizerError(f"n_units must be positive, got {units}")
    return UnitVocab.gslm(units)


def stored_vocab(d: dict[str, Any], vocab: UnitVocab | None) -> UnitVocab:
    """The vocabulary to rebuild a stored verbalizer on: ``vocab`` (the loaded LM's), which must have the stored
    number of units, or GSLM's layout."""
    try:
        n_units = int(d["n_units"])
    except KeyError:
        raise VerbalizerError("verbalizer description lacks 'n_units'") from None
    if vocab is None:
        return as_vocab(n_units)
    check_n_units(n_units, vocab)
    return vocab

_BUILDERS: dict[str, Builder] = {}
_LOADERS: dict[str, Loader] = {}


def register_builder(*kinds: str) -> Callable[[Builder], Builder]:
    """Register ``fn(cfg, train_labels, train_units, n_units or vocab) -> Verbalizer`` for ``kinds``."""

    def deco(fn: Builder) -> Builder:
        for kind in kinds:
            _BUILDERS[kind] = fn
        return fn

    return deco


def register_loader(*kinds: str) -> Callable[[Loader], Loader]:
    """Register ``fn(to_dict output, LM vocabulary or None) -> Verbalizer`` for ``kinds``."""

    def deco(fn: Loader) -> Loader:
        for kind in kinds:
            _LOADERS[kind] = fn
        return fn

    return deco


def build_verbalizer(
    cfg: VerbalizerConfig, train_labels: Sequence[str], train_units: Sequence[Sequence[int]], n_units: Units
) -> Verbalizer:
    """Fit the verbalizer ``cfg.kind`` on a training split.

    Args:
        cfg: The verbalizer config.
        train_labels: One label (classification) or transcript (sequence tasks) per training utterance.
        train_units: The training inputs as unit *token* ids (unit + 4 in GSLM's layout), one list per utterance;
            only their unit frequencies are used.
        n_units: Number of units K of the unit LM's dictionary, or the LM's :class:`UnitVocab`.
    """
    return _BUILDERS[VerbalizerKind(cfg.kind).value](cfg, train_labels, train_units, n_units)


def verbalizer_from_dict(d: dict[str, Any], vocab: UnitVocab | None = None) -> Verbalizer:
    """Rebuild any verbalizer from its :meth:`~Verbalizer.to_dict` output, on the LM vocabulary ``vocab`` (default:
    GSLM's layout with the stored number of units)."""
    if not isinstance(d, dict) or "kind" not in d:
        raise VerbalizerError("a verbalizer description must be a mapping with a 'kind'")
    version = d.get("format_version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise VerbalizerError(
            f"verbalizer format version {version} is newer than this toolkit reads ({FORMAT_VERSION}); upgrade it"
        )
    loader = _LOADERS.get(d["kind"])
    if loader is None:
        raise VerbalizerError(f"unknown verbalizer kind {d['kind']!r}; known kinds: {', '.join(sorted(_LOADERS))}")
    return loader(d, vocab)


def check_n_units(n_units: int, n_tokens: int | UnitVocab) -> None:
    """The shared body of ``check_vocab``: the model's dictionary (its size with GSLM's 4 specials, or its
    :class:`UnitVocab`) must hold exactly ``n_units`` units."""
    if isinstance(n_tokens, UnitVocab):
        if n_tokens.num_units != n_units:
            raise VerbalizerError(f"verbalizer was built for {n_units} units but the model has "
                                  f"{n_tokens.num_units} ({n_tokens.layout} vocabulary)")
        return
    model_units = n_tokens - NSPECIAL
    if model_units != n_units:
        raise VerbalizerError(
            f"verbalizer was built for {n_units} units but the model has {model_units} "
            f"({n_tokens} tokens with the 4 specials)"
        )


def unit_ranking(train_units: Iterable[Sequence[int]], n_units: Units) -> list[int]:
    """Unit token ids from the most to the least frequent in the training inputs.

    Ties (including units never seen) are broken by the smaller id, so the ranking is deterministic.

    Raises:
        VerbalizerError: an id is not a unit token (they are unit + 4: raw unit ids would be misread).
    """
    vocab = as_vocab(n_units)
    first, n = vocab.unit_offset, vocab.num_units
    tokens = np.fromiter(itertools.chain.from_iterable(train_units), dtype=np.int64)
    bad = tokens[(tokens < first) | (tokens >= first + n)]
    if bad.size:
        raise VerbalizerError(
            f"training inputs hold token id {int(bad[0])}, which is not a unit token (units are ids "
            f"{first}..{first + n - 1}: unit u is token u + {first})"
        )
    counts = np.bincount(tokens, minlength=first + n).tolist()
    return sorted(range(first, first + n), key=lambda t: (-counts[t], t))


def strip_eos(ids: Sequence[int], eos: int = EOS) -> list[int]:
    """Token ids up to (not including) the first ``eos`` (``</s>``)."""
    ids = [int(i) for i in ids]
    return ids[: ids.index(eos)] if eos in ids else ids


def unseen_label_error(label: str, known: Sequence[str]) -> VerbalizerError:
    shown = ", ".join(repr(k) for k in known[:8]) + (f", ... ({len(known)} in all)" if len(known) > 8 else "")
    return VerbalizerError(f"label {label!r} was not seen when the verbalizer was built; known labels: {shown}")
