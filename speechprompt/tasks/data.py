"""LM-formatted task data: ``u1 ... uN <s> y1 ... yM </s>``, batched for training and decoding.

A split is a ``.units`` file (one utterance per line, space-separated unit ids, as ``speechprompt prepare`` writes)
and a ``.labels`` file (one label or transcript per line, same order). An empty units line is an utterance that
``prepare`` could not convert; it is dropped here together with its label, and the count is logged.

Unit ``u`` becomes the LM's token for it (``u + 4`` in fairseq's GSLM dictionary; see
:class:`~speechprompt.models.unit_vocab.UnitVocab` for the others), the label becomes the verbalizer's tokens, and
:func:`collate` right-pads rows with ``<pad>`` and marks which positions carry a loss: the ``<s>`` position and
every label position, each predicting the next token (``y1 ... yM </s>``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from speechprompt.errors import SpeechPromptError
from speechprompt.fileio import read_json
from speechprompt.models.unit_vocab import UnitVocab
from speechprompt.verbalizers import Verbalizer
from speechprompt.verbalizers.base import Units, as_vocab

logger = logging.getLogger(__name__)

IGNORE = -100  # target id that cross-entropy skips
GSLM_BOS, GSLM_PAD, GSLM_EOS = 0, 1, 2  # fairseq's dictionary, the default layout


class DataError(SpeechPromptError, ValueError):
    """A units or labels file that cannot be used for a task."""


def read_units(path: str | os.PathLike) -> list[list[int] | None]:
    """Read a ``.units`` file: one list of unit ids per line, ``None`` for an empty (skipped) line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"cannot read units {path}: {e.strerror}") from None
    out: list[list[int] | None] = []
    for n, line in enumerate(lines, 1):
        fields = line.split()
        try:
            out.append([int(u) for u in fields] if fields else None)
        except ValueError:
            raise DataError(f"{path}:{n}: expected space-separated unit ids, got {line[:60]!r}") from None
    return out


def read_labels(path: str | os.PathLike) -> list[str]:
    """Read a ``.labels`` file: one label (or transcript) per line."""
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"cannot read labels {path}: {e.strerror}") from None


def units_summary(units_path: str | os.PathLike) -> dict | None:
    """The ``<stem>.summary.json`` that ``speechprompt prepare`` writes beside a units file, if there is one.

    It records the feature reader, the quantizer (path and fingerprint) and whether units were deduplicated, which
    a checkpoint stores so that ``infer`` can rebuild the same unit pipeline from audio.
    """
    p = Path(units_path)
    summary = p.with_name(p.name[: -len(".units")] + ".summary.json") if p.name.endswith(".units") else None
    if summary is None or not summary.is_file():
        return None
    try:
        return read_json(summary)
    except (OSError, ValueError) as e:
        logger.warning("ignoring unreadable %s: %s", summary, e)
        return None


@dataclasses.dataclass
class Split:
    """The utterances of one split that have units, as unit *token* ids of the LM's vocabulary (unit + 4 in
    GSLM's), with their labels."""

    tokens: list[list[int]]
    labels: list[str]
    rows: list[int]  # line numbers (0-based) in the source files, for reports
    name: str = ""
    vocab: UnitVocab | None = None  # the LM's unit layout (None: GSLM's), which batches use for <s> </s> <pad>

    def __len__(self) -> int:
        return len(self.tokens)


def load_split(
    units_path: str | os.PathLike,
    labels_path: str | os.PathLike | None,
    n_units: Units,
    max_len: int | None = None,
    name: str = "",
) -> Split:
    """Read a split and check it against the unit LM's dictionary.

    Args:
        units_path: The ``.units`` file.
        labels_path: Its ``.labels`` file (same number of lines), or ``None`` for unlabelled inference data.
        n_units: Number of units K of the unit LM (GSLM's layout), or its :class:`UnitVocab`; every unit id must be
            in ``[0, K)``.
        max_len: Keep at most this many units per utterance (the first ones); ``None`` keeps all.
        name: Name of the split in messages.

    Raises:
        DataError: mismatched line counts, a unit outside the dictionary, or no usable utterance.
    """
    vocab = as_vocab(n_units)
    n_units = vocab.num_units
    units = read_units(units_path)
    labels = read_labels(labels_path) if labels_path is not None else [""] * len(units)
    if len(labels) != len(units):
        raise DataError(f"{units_path} has {len(units)} lines but {labels_path} has {len(labels)}: they must be "
                        "line-aligned (line i of both belongs to manifest row i)")
    tokens, kept_labels, rows = [], [], []
    for i, (u, label) in enumerate(zip(units, labels)):
        if u is None:
            continue
        bad = [x for x in u if not 0 <= x < n_units]
        if bad:
            raise DataError(f"{units_path}:{i + 1}: unit {bad[0]} is outside the unit LM's {n_units} units "
                            f"({vocab.layout} vocabulary; units from another quantizer?)")
        if max_len is not None:
            u = u[:max_len]
        tokens.append([x + vocab.unit_offset for x in u])
        kept_labels.append(label)
        rows.append(i)
    if len(tokens) < len(units):
        logger.info("%s: dropped %d of %d utterances with no units (skipped by prepare)", units_path,
                    len(units) - len(tokens), len(units))
    if not tokens:
        raise DataError(f"{units_path}: no utterance has units")
    return Split(tokens, kept_labels, rows, name or Path(units_path).stem, vocab)


@dataclasses.dataclass
class Batch:
    """A padded batch of LM-formatted examples.

    Attributes:
        tokens: ``(B, T)`` ``u1..uN <s> y1..yM``, right-padded with ``<pad>``.
        targets: ``(B, T)`` the next token where a loss is taken (``<s>`` and label positions), else ``IGNORE``.
        prefix: ``(B, P)`` ``u1..uN <s>`` *left*-padded, for decoding: every row's next token is then at the
            same column, and positions count only real tokens, so left padding changes no output.
        prefix_lengths: ``(B,)`` N + 1.
        source_lengths: ``(B,)`` N.
        class_ids: ``(B,)`` class index of each label (``-1`` when the task has no closed label set or the label
            is unknown to the verbalizer).
        labels: the labels as text.
        index: ``(B,)`` position of each utterance in its :class:`Split`.
    """

    tokens: Tensor
    targets: Tensor
    prefix: Tensor
    prefix_lengths: Tensor
    source_lengths: Tensor
    class_ids: Tensor
    labels: list[str]
    index: Tensor

    def to(self, device: torch.device | str) -> Batch:
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                     if isinstance(getattr(self, f.name), Tensor)}
        )

    def __len__(self) -> int:
        return self.tokens.size(0)


def _pad(rows: Sequence[Sequence[int]], value: int, left: bool = False) -> Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        start = width - len(r) if left else 0
        out[i, start : start + len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out


def collate(
    sources: Sequence[Sequence[int]],
    labels: Sequence[str],
    verbalizer: Verbalizer | None,
    index: Sequence[int] | None = None,
    vocab: UnitVocab | None = None,
) -> Batch:
    """Build a :class:`Batch` from unit token ids and labels.

    Args:
        sources: Unit token ids (unit + 4 in GSLM's layout) per utterance.
        labels: One label per utterance.
        verbalizer: Encodes labels into target tokens. ``None`` (a linear probe) gives empty targets.
        index: Position of each utterance in its split (default ``0..B-1``).
        vocab: The LM's unit layout, for ``<s>``, ``</s>`` and ``<pad>`` (default GSLM's).
    """
    bos, eos, pad = (GSLM_BOS, GSLM_EOS, GSLM_PAD) if vocab is None else (vocab.bos, vocab.eos, vocab.pad)
    class_index = {label: i for i, label in enumerate(verbalizer.labels)} if verbalizer is not None else {}
    rows, targets = [], []
    for src, label in zip(sources, labels):
        # A label the verbalizer has never seen (a dev/test class absent from training) has no target: it still
        # gets a prediction, which counts as wrong. Sequence verbalizers have no closed set and encode any text.
        known = verbalizer is not None and (label in class_index or not class_index)
        y = list(verbalizer.encode(label)) if known else []
        row = list(src) + [bos] + y  # u1..uN <s> y1..yM
        nxt = [IGNORE] * len(src) + y + [eos] if y else [IGNORE] * (len(src) + 1)  # next token at each position
        rows.append(row)
        targets.append(nxt)
    prefixes = [list(s) + [bos] for s in sources]
    return Batch(
        tokens=_pad(rows, pad),
        targets=_pad(targets, IGNORE),
        prefix=_pad(prefixes, pad, left=True),
        prefix_lengths=torch.tensor([len(p) for p in prefixes], dtype=torch.long),
        source_lengths=torch.tensor([len(s) for s in sources], dtype=torch.long),
        class_ids=torch.tensor([class_index.get(label, -1) for label in labels], dtype=torch.long),
        labels=list(labels),
        index=torch.as_tensor(list(index) if index is not None else range(len(sources)), dtype=torch.long),
    )


def batch_indices(
    split: Split, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
) -> list[list[int]]:
    """The utterance indices of every batch of a split, in order or shuffled with ``generator``.

    Batches group utterances of similar length to waste less padding (random batches of the demo's commands pad
    ~1.4x the real tokens; length-grouped ones ~1.02x). Shuffled, it is fairseq's recipe: a random permutation,
    stably sorted by length (so equal lengths land in a new random order each epoch), cut into batches whose
    order is then shuffled.
    """
    n = len(split)
    if shuffle:
        order = torch.randperm(n, generator=generator).tolist()
        order.sort(key=lambda i: len(split.tokens[i]))  # stable: ties keep their random order
    else:
        order = sorted(range(n), key=lambda i: len(split.tokens[i]))
    groups = [order[start : start + batch_size] for start in range(0, n, batch_size)]
    if shuffle:
        groups = [groups[g] for g in torch.randperm(len(groups), generator=generator).tolist()]
    return groups


def collate_rows(split: Split, rows: Sequence[int], verbalizer: Verbalizer | None) -> Batch:
    """The :class:`Batch` of utterances ``rows`` of ``split`` (its ``index`` says which)."""
    return collate([split.tokens[i] for i in rows], [split.labels[i] for i in rows], verbalizer, rows, split.vocab)


def batches(
    split: Split,
    verbalizer: Verbalizer | None,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> list[Batch]:
    """All batches of a split (see :func:`batch_indices`), collated."""
    return [collate_rows(split, rows, verbalizer) for rows in batch_indices(split, batch_size, shuffle, generator)]


def lm_logits(model: torch.nn.Module, method: torch.nn.Module, tokens: Tensor) -> Tensor:
    """``(B, T, V)`` logits of the frozen LM with the tuning method's forward arguments (prompts, separator)."""
    return model(tokens, **method.forward_kwargs(tokens.size(0)))


def lm_loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, int]:
    """Summed cross-entropy over the positions that carry a target (``<s>`` and label positions), and how many.

    Trainers normalise by the terms of a whole update (every micro-batch and process), so the loss of a task is a
    sum, never a per-batch mean.

    Args:
        logits: ``(B, T, V)``.
        targets: ``(B, T)`` next-token ids, :data:`IGNORE` where no loss is taken.
    """
    total = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum"
    )  # (B*T, V) against (B*T,)
    return total, int(targets.ne(IGNORE).sum())


def class_loss(logits: Tensor, class_ids: Tensor) -> tuple[Tensor, int]:
    """Summed cross-entropy of ``(B, C)`` class logits over the rows with a known class (``class_ids >= 0``), and
    how many there are."""
    total = torch.nn.functional.cross_entropy(logits.float(), class_ids, ignore_index=-1, reduction="sum")
    return total, int(class_ids.ge(0).sum())


def mean_loss(loss: tuple[Tensor, int]) -> Tensor:
    """The mean of a summed loss (NaN when it has no term: a batch of only unseen labels)."""
    total, terms = loss
    return total / terms if terms else total.new_tensor(float("nan"))
