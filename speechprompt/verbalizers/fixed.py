"""Fixed verbalizers: every label is a fixed-length sequence of unit tokens (SpeechPrompt v1).

Three ways to choose the units, all giving a :class:`FixedVerbalizer`:

* ``freq``: labels ranked by training frequency are mapped to units ranked by frequency in the training inputs,
  so the most frequent label gets the unit the LM already emits most readily. Ties go to the smaller label
  string and the smaller unit id.
* ``random``: a seeded random injective map.
* ``map``: an explicit ``{label: [unit ids]}`` JSON map written by the user (format in ``verbalizers/README.md``).

Multi-slot labels (Fluent Speech Commands ``action|object|location``) are split at ``slot_separator`` and each
slot value gets its own token, so a label is ``S`` tokens long. Values are ranked *within their slot*, and units
are dealt out rank by rank across slots (the top value of every slot first, then the second values, ...), so
every slot's most frequent values get the most frequent units. Each (slot, value) pair gets its own unit: a value
that occurs in several slots ("none" as object and as location) gets one unit per slot, and every token decodes
unambiguously both by its position and by itself.
"""

from __future__ import annotations

import collections
import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from speechprompt.models.unit_vocab import UnitVocab
from speechprompt.verbalizers.base import (
    FORMAT_VERSION,
    UNKNOWN_LABEL,
    Units,
    VerbalizerConfig,
    VerbalizerError,
    as_vocab,
    check_n_units,
    register_builder,
    register_loader,
    stored_vocab,
    strip_eos,
    unit_ranking,
    unseen_label_error,
)


class FixedVerbalizer:
    """An injective map from labels to fixed-length unit token sequences.

    Args:
        units: ``{label: [unit ids]}``, unit ids in ``[0, n_units)``, every sequence of the same length. The
            mapping's order is the class order.
        n_units: Number of units K of the unit LM's dictionary, or its :class:`UnitVocab` (token ids follow it).
        kind: How the map was made (``freq``, ``random`` or ``map``); recorded, not interpreted.
        slot_separator: The separator the labels were split at when the map was made, if any; recorded.

    Raises:
        VerbalizerError: a unit out of range, sequences of different lengths, or two labels on one sequence.
    """

    def __init__(
        self,
        units: Mapping[str, Sequence[int]],
        n_units: Units,
        kind: str = "map",
        slot_separator: str | None = None,
    ) -> None:
        self.vocab = as_vocab(n_units)
        n_units = self.vocab.num_units
        if not units:
            raise VerbalizerError("a verbalizer needs at least one label")
        self.kind = kind
        self.n_units = n_units
        self.slot_separator = slot_separator
        self._targets: dict[str, tuple[int, ...]] = {}
        inverse: dict[tuple[int, ...], str] = {}
        length = None
        for label, seq in units.items():
            if not isinstance(label, str) or not label or label == UNKNOWN_LABEL:
                raise VerbalizerError(f"label {label!r} is not allowed (labels are non-empty strings, not "
                                      f"{UNKNOWN_LABEL!r})")
            seq = [seq] if isinstance(seq, int) and not isinstance(seq, bool) else seq
            if not isinstance(seq, (list, tuple)) or not seq:
                raise VerbalizerError(f"label {label!r}: expected a non-empty list of unit ids, got {seq!r}")
            for u in seq:
                if not isinstance(u, int) or isinstance(u, bool) or not 0 <= u < n_units:
                    raise VerbalizerError(f"label {label!r}: unit {u!r} is not a unit id in 0..{n_units - 1}")
            if length is None:
                length = len(seq)
            elif len(seq) != length:
                raise VerbalizerError(
                    f"label {label!r} has {len(seq)} units but the others have {length}: all labels of a "
                    "classification task need the same number of units"
                )
            tokens = tuple(self.vocab.token(u) for u in seq)
            if tokens in inverse:
                raise VerbalizerError(
                    f"labels {inverse[tokens]!r} and {label!r} both map to units {list(seq)}: the map must be "
                    "injective so that every label can be decoded"
                )
            inverse[tokens] = label
            self._targets[label] = tokens
        self._inverse = inverse
        self._index = {label: i for i, label in enumerate(self._targets)}

    # -- constructors -------------------------------------------------------------------------------------------

    @classmethod
    def fit_freq(
        cls,
        train_labels: Sequence[str],
        train_units: Sequence[Sequence[int]],
        n_units: Units,
        slot_separator: str | None = None,
    ) -> FixedVerbalizer:
        """Most frequent label (slot value) -> most frequent unit in the training inputs.

        Args:
            train_labels: One label per training utterance.
            train_units: Training inputs as unit token ids (unit + 4).
            n_units: Number of units K.
            slot_separator: Split labels into slots with one token each (see the module docstring).
        """
        ranked_units = unit_ranking(train_units, n_units)
        classes, per_utt = _split_slots(train_labels, slot_separator)
        # Per slot: values from the most to the least frequent over all training utterances, ties by value.
        ranked_values = []
        for column in zip(*per_utt):
            counts = collections.Counter(column)
            ranked_values.append(sorted(counts, key=lambda v: (-counts[v], v)))
        # Deal units rank by rank across slots: (rank 0 of slot 0, rank 0 of slot 1, ..., rank 1 of slot 0, ...).
        order = [
            (s, values[r])
            for r in range(max(len(v) for v in ranked_values))
            for s, values in enumerate(ranked_values)
            if r < len(values)
        ]
        _check_capacity(len(order), n_units, slot_separator)
        unit_of = {pair: ranked_units[i] - as_vocab(n_units).unit_offset for i, pair in enumerate(order)}
        return cls(_compose(classes, unit_of), n_units, kind="freq", slot_separator=slot_separator)

    @classmethod
    def fit_random(
        cls, train_labels: Sequence[str], n_units: Units, seed: int = 0, slot_separator: str | None = None
    ) -> FixedVerbalizer:
        """A seeded random injective map of labels (slot values) to units."""
        classes, _ = _split_slots(train_labels, slot_separator)
        pairs = sorted({(s, v) for _, values in classes for s, v in enumerate(values)})
        _check_capacity(len(pairs), n_units, slot_separator)
        drawn = random.Random(seed).sample(range(as_vocab(n_units).num_units), len(pairs))
        return cls(_compose(classes, dict(zip(pairs, drawn))), n_units, kind="random", slot_separator=slot_separator)

    @classmethod
    def from_map_file(cls, path: str | Path, n_units: Units) -> FixedVerbalizer:
        """Read a user's JSON map (format in ``verbalizers/README.md``)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise VerbalizerError(f"{path}: cannot read verbalizer map ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise VerbalizerError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_map(data, n_units)
        except VerbalizerError as e:
            raise VerbalizerError(f"{path}: {e}") from None

    @classmethod
    def from_map(cls, data: Mapping[str, Any], n_units: Units) -> FixedVerbalizer:
        """Build from a bare ``{label: [unit ids]}`` or the wrapped ``{"map": {...}, "n_units": K, ...}`` form."""
        if not isinstance(data, Mapping):
            raise VerbalizerError("a verbalizer map must be a JSON object")
        if isinstance(data.get("map"), Mapping):
            unknown = sorted(set(data) - {"map", "n_units", "slot_separator", "description"})
            if unknown:
                raise VerbalizerError(
                    f"unknown key {unknown[0]!r} in verbalizer map; known: description, map, n_units, slot_separator"
                )
            if "n_units" in data and data["n_units"] != as_vocab(n_units).num_units:
                raise VerbalizerError(
                    f"verbalizer was built for {data['n_units']} units but the model has {as_vocab(n_units).num_units}"
                )
            return cls(data["map"], n_units, kind="map", slot_separator=data.get("slot_separator"))
        return cls(data, n_units, kind="map")

    @classmethod
    def from_dict(cls, d: dict[str, Any], vocab: UnitVocab | None = None) -> FixedVerbalizer:
        """Rebuild from :meth:`to_dict` output (on the LM vocabulary ``vocab``, GSLM's by default)."""
        try:
            return cls(d["map"], stored_vocab(d, vocab), kind=d["kind"], slot_separator=d.get("slot_separator"))
        except KeyError as e:
            raise VerbalizerError(f"verbalizer description lacks {e.args[0]!r}") from None

    # -- the verbalizer interface -------------------------------------------------------------------------------

    @property
    def labels(self) -> list[str]:
        return list(self._targets)

    @property
    def target_length(self) -> int:
        return len(next(iter(self._targets.values())))

    def index(self, label: str) -> int:
        """Class index of ``label`` (its position in :attr:`labels`)."""
        try:
            return self._index[label]
        except KeyError:
            raise unseen_label_error(label, self.labels) from None

    def encode(self, label: str) -> list[int]:
        """Token ids (unit + 4) of ``label``, without ``<s>`` or ``</s>``.

        Raises:
            VerbalizerError: ``label`` is not one of :attr:`labels`.
        """
        try:
            return list(self._targets[label])
        except KeyError:
            raise unseen_label_error(label, self.labels) from None

    def decode(self, ids: Sequence[int], strict: bool = False) -> str:
        """The label of emitted token ids; a ``</s>`` and anything after it are ignored.

        Args:
            ids: Token ids emitted after ``<s>``.
            strict: Raise instead of returning :data:`UNKNOWN_LABEL` for a sequence that is no label.

        Returns:
            The label, or :data:`UNKNOWN_LABEL` (``"<unk>"``), which counts as wrong in every metric.
        """
        tokens = tuple(strip_eos(ids, self.vocab.eos))
        label = self._inverse.get(tokens)
        if label is None:
            if strict:
                raise VerbalizerError(f"token ids {list(tokens)} are the target of no label")
            return UNKNOWN_LABEL
        return label

    def candidates(self) -> torch.Tensor:
        """``(C, L)`` token ids of every label, in :attr:`labels` order."""
        return torch.tensor(list(self._targets.values()), dtype=torch.long)

    def check_vocab(self, n_tokens: int | UnitVocab) -> None:
        check_n_units(self.n_units, n_tokens)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable; its ``map`` is also a valid user map file."""
        return {
            "kind": self.kind,
            "format_version": FORMAT_VERSION,
            "n_units": self.n_units,
            "slot_separator": self.slot_separator,
            "map": {label: [self.vocab.unit(t) for t in tokens] for label, tokens in self._targets.items()},
        }

    def __repr__(self) -> str:
        return f"FixedVerbalizer(kind={self.kind!r}, labels={len(self._targets)}, length={self.target_length})"


def _split_slots(
    train_labels: Sequence[str], sep: str | None
) -> tuple[list[tuple[str, tuple[str, ...]]], list[tuple[str, ...]]]:
    """Split labels into slot values.

    Returns:
        The distinct labels in sorted order (the class order) with their slot values, and the slot values of
        every training utterance (for counting).
    """
    if not train_labels:
        raise VerbalizerError("no training labels to build a verbalizer from")
    split = {label: (label,) if sep is None else tuple(label.split(sep)) for label in sorted(set(train_labels))}
    first = next(iter(split))
    for label, values in split.items():
        if len(values) != len(split[first]):
            raise VerbalizerError(
                f"label {label!r} has {len(values)} slots but {first!r} has {len(split[first])} (separator {sep!r})"
            )
    return list(split.items()), [split[label] for label in train_labels]


def _compose(
    classes: list[tuple[str, tuple[str, ...]]], unit_of: dict[tuple[int, str], int]
) -> dict[str, list[int]]:
    """Label -> units, where slot i's value v contributes ``unit_of[(i, v)]``."""
    return {label: [unit_of[(i, v)] for i, v in enumerate(values)] for label, values in classes}


def _check_capacity(n_symbols: int, n_units: Units, sep: str | None) -> None:
    n_units = as_vocab(n_units).num_units
    if n_symbols > n_units:
        what = "slot values" if sep is not None else "labels"
        raise VerbalizerError(f"{n_symbols} {what} need distinct units but the unit LM has only {n_units}")


@register_builder("freq")
def _build_freq(cfg: VerbalizerConfig, train_labels: Sequence[str], train_units: Sequence[Sequence[int]],
                n_units: Units) -> FixedVerbalizer:
    return FixedVerbalizer.fit_freq(train_labels, train_units, n_units, slot_separator=cfg.slot_separator)


@register_builder("random")
def _build_random(cfg: VerbalizerConfig, train_labels: Sequence[str], train_units: Sequence[Sequence[int]],
                  n_units: Units) -> FixedVerbalizer:
    return FixedVerbalizer.fit_random(train_labels, n_units, seed=cfg.seed, slot_separator=cfg.slot_separator)


@register_builder("map")
def _build_map(cfg: VerbalizerConfig, train_labels: Sequence[str], train_units: Sequence[Sequence[int]],
               n_units: Units) -> FixedVerbalizer:
    assert cfg.map_path is not None  # VerbalizerConfig checks it
    verbalizer = FixedVerbalizer.from_map_file(cfg.map_path, n_units)
    known = set(verbalizer.labels)
    missing = sorted(set(train_labels) - known)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise VerbalizerError(f"{cfg.map_path}: training labels missing from the map: {shown}")
    return verbalizer


register_loader("freq", "random", "map")(FixedVerbalizer.from_dict)
