"""Task metrics: classification (accuracy, macro F1, confusion matrix), ASR (WER, CER) and SUPERB slot filling.

Every metric takes references first, then hypotheses, as parallel sequences. Error rates are corpus-level: the
total edit distance over the total reference length (words or characters), as s3prl and SUPERB compute them, not
a mean of per-utterance rates. Texts are compared after whitespace normalisation (``" ".join(t.split())``).

When a corpus has no reference word or character at all, an error rate is 0.0 if every hypothesis is empty too
and ``inf`` otherwise (every inserted token is an error against nothing).

The slot filling metrics follow s3prl's ``downstream/ctc/metric.py`` for Audio SNIPS (SUPERB SF): slots are
``B-<type> <value> E-<type>`` spans inside the text. ``slot_type_f1`` is the per-utterance F1 between the *sets*
of slot types in reference and hypothesis, averaged over utterances (1.0 when both have none, 0.0 when only one
has none). ``slot_value_cer`` pairs every reference slot value with the hypothesis value of the same type that has
the lowest CER (the first one on ties, ``""`` if the type is missing) and reports the corpus CER of those pairs;
hypothesis slots of types absent from the reference are not counted. Two deliberate differences, neither of
which changes a result s3prl produces: slots are kept as (type, value) pairs rather than ``"value:type"`` strings,
so values holding ``:`` or ``;`` no longer crash, and ``slot_value_cer`` of a corpus without reference slots is
0.0 where s3prl divides by zero.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Sequence
from typing import NamedTuple

import numpy as np

from speechprompt.errors import SpeechPromptError


class MetricError(SpeechPromptError, ValueError):
    """Inputs a metric cannot be computed on (different lengths, no examples, a label outside the list)."""


def _check_pair(refs: Sequence, hyps: Sequence, allow_empty: bool = False) -> None:
    if len(refs) != len(hyps):
        raise MetricError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs and not allow_empty:
        raise MetricError("no examples to score")


# -- classification ---------------------------------------------------------------------------------------------


def accuracy(y_true: Sequence[Hashable], y_pred: Sequence[Hashable]) -> float:
    """Fraction of predictions equal to their reference."""
    _check_pair(y_true, y_pred)
    return sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true)


def macro_f1(
    y_true: Sequence[Hashable], y_pred: Sequence[Hashable], labels: Sequence[Hashable] | None = None
) -> float:
    """Unweighted mean over classes of ``F1 = 2TP / (2TP + FP + FN)``.

    Args:
        y_true: Reference labels.
        y_pred: Predicted labels.
        labels: The classes to average over; default: every label in ``y_true`` or ``y_pred``. A class with no
            reference and no prediction has F1 0.0 (as scikit-learn's ``zero_division=0``).
    """
    _check_pair(y_true, y_pred)
    classes = list(labels) if labels is not None else sorted(set(y_true) | set(y_pred), key=str)
    if not classes:
        raise MetricError("no classes to average over")
    scores = []
    for c in classes:
        tp = sum(t == c and p == c for t, p in zip(y_true, y_pred))
        fp = sum(t != c and p == c for t, p in zip(y_true, y_pred))
        fn = sum(t == c and p != c for t, p in zip(y_true, y_pred))
        denominator = 2 * tp + fp + fn
        scores.append(2 * tp / denominator if denominator else 0.0)
    return float(np.mean(scores))


def confusion_matrix(
    y_true: Sequence[Hashable], y_pred: Sequence[Hashable], labels: Sequence[Hashable]
) -> np.ndarray:
    """``(C, C)`` int64 counts; row = reference class, column = predicted class, in ``labels`` order.

    Raises:
        MetricError: a reference or prediction outside ``labels``. Nothing is dropped silently: to count
            undecodable predictions, add the verbalizer's ``"<unk>"`` to ``labels``.
    """
    _check_pair(y_true, y_pred, allow_empty=True)
    index = {label: i for i, label in enumerate(labels)}
    if len(index) != len(labels):
        raise MetricError("labels of a confusion matrix must be distinct")
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        for which, label in (("reference", t), ("prediction", p)):
            if label not in index:
                raise MetricError(f"{which} {label!r} is not in the confusion matrix labels")
        matrix[index[t], index[p]] += 1
    return matrix


# -- edit distance and error rates ------------------------------------------------------------------------------


def edit_distance(ref: Sequence[Hashable], hyp: Sequence[Hashable]) -> int:
    """Levenshtein distance (unit-cost substitutions, deletions, insertions) between two sequences or strings."""
    if len(ref) == 0 or len(hyp) == 0:
        return max(len(ref), len(hyp))
    vocab: dict[Hashable, int] = {}
    r = [vocab.setdefault(x, len(vocab)) for x in ref]
    h = np.array([vocab.setdefault(x, len(vocab)) for x in hyp], dtype=np.int64)
    # One DP row per reference item, vectorised over the hypothesis. Substitution and deletion read the previous
    # row; insertion (cur[j] = cur[j-1] + 1) is a running minimum: cur[j] = j + min_{k<=j}(tmp[k] - k).
    offsets = np.arange(len(h) + 1, dtype=np.int64)
    prev = offsets.copy()
    for i, token in enumerate(r, 1):
        tmp = np.empty_like(prev)
        tmp[0] = i
        np.minimum(prev[:-1] + (h != token), prev[1:] + 1, out=tmp[1:])
        prev = np.minimum.accumulate(tmp - offsets) + offsets
    return int(prev[-1])


def _rate(errors: int, total: int) -> float:
    if total == 0:
        return 0.0 if errors == 0 else float("inf")
    return errors / total


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus word error rate: total word edits / total reference words."""
    _check_pair(refs, hyps)
    pairs = [(r.split(), h.split()) for r, h in zip(refs, hyps)]
    return _rate(sum(edit_distance(r, h) for r, h in pairs), sum(len(r) for r, _ in pairs))


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus character error rate: total character edits / total reference characters (spaces included)."""
    _check_pair(refs, hyps)
    pairs = [(" ".join(r.split()), " ".join(h.split())) for r, h in zip(refs, hyps)]
    return _rate(sum(edit_distance(r, h) for r, h in pairs), sum(len(r) for r, _ in pairs))


# -- SUPERB slot filling (Audio SNIPS) ----------------------------------------------------------------------------

_SLOT = re.compile(r"B\-(\S+) (.+?) E\-\1")
_OPEN_TAG = re.compile(r"B\-(\S+) ")
_CLOSE_TAG = re.compile(r" E\-(\S+)")


def strip_slot_tags(text: str) -> str:
    """The text without ``B-<type>`` and ``E-<type>`` tags (s3prl's ``clean``), e.g. for the WER of SF output."""
    return _CLOSE_TAG.sub("", _OPEN_TAG.sub("", text))


def parse_slots(text: str, clean_values: bool = False) -> list[tuple[str, str]]:
    """``(type, value)`` of every ``B-<type> <value> E-<type>`` span, left to right.

    Args:
        text: A tagged transcript, e.g. ``"play B-artist lil wayne E-artist"``.
        clean_values: Strip tags nested inside values (s3prl does so for hypotheses only).
    """
    spans = _SLOT.findall(re.sub(r" +", " ", text))
    return [(kind, strip_slot_tags(value) if clean_values else value) for kind, value in spans]


def _slot_dicts(ref: str, hyp: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    ref_slots: dict[str, list[str]] = {}
    hyp_slots: dict[str, list[str]] = {}
    for kind, value in parse_slots(ref):
        ref_slots.setdefault(kind, []).append(value)
    for kind, value in parse_slots(hyp, clean_values=True):
        hyp_slots.setdefault(kind, []).append(value)
    return ref_slots, hyp_slots


def slot_type_f1(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """SUPERB slot-type F1: per-utterance F1 of the sets of slot types, averaged over utterances."""
    _check_pair(refs, hyps)
    scores = []
    for ref, hyp in zip(refs, hyps):
        ref_types, hyp_types = (set(d) for d in _slot_dicts(ref, hyp))
        if not ref_types and not hyp_types:
            scores.append(1.0)
        elif not ref_types or not hyp_types:
            scores.append(0.0)
        else:
            common = len(ref_types & hyp_types)
            precision, recall = common / len(hyp_types), common / len(ref_types)
            scores.append(2 * precision * recall / (precision + recall) if common else 0.0)
    return sum(scores) / len(scores)


def slot_value_cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """SUPERB slot-value CER: each reference value against the closest hypothesis value of its type."""
    _check_pair(refs, hyps)
    errors = total = 0
    for ref, hyp in zip(refs, hyps):
        ref_slots, hyp_slots = _slot_dicts(ref, hyp)
        for kind, values in ref_slots.items():
            for value in values:
                # The first hypothesis value with the fewest edits ("" when the type was not predicted).
                errors += min(edit_distance(value, h) for h in hyp_slots.get(kind, [""]))
                total += len(value)
    return errors / total if total else 0.0


# -- by name, for configs -------------------------------------------------------------------------------------------


class Metric(NamedTuple):
    fn: Callable[[Sequence, Sequence], float]
    higher_is_better: bool


METRICS: dict[str, Metric] = {
    "accuracy": Metric(accuracy, True),
    "macro_f1": Metric(macro_f1, True),
    "wer": Metric(wer, False),
    "cer": Metric(cer, False),
    "slot_type_f1": Metric(slot_type_f1, True),
    "slot_value_cer": Metric(slot_value_cer, False),
}


def compute_metrics(names: Sequence[str], refs: Sequence, hyps: Sequence) -> dict[str, float]:
    """``{name: value}`` for the named metrics of :data:`METRICS`."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise MetricError(f"unknown metric {unknown[0]!r}; known metrics: {', '.join(METRICS)}")
    return {name: METRICS[name].fn(refs, hyps) for name in names}
