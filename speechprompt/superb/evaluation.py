"""Scoring a SUPERB model on an audio split: the head's metrics, over the files that could be read, and the report
files (metrics JSON, predictions, confusion matrix) that ``speechprompt evaluate`` and ``compare`` write."""

from __future__ import annotations

import os
from typing import Any

import torch

from speechprompt.errors import AudioError
from speechprompt.superb.data import AudioSplit, read_batches
from speechprompt.superb.model import SuperbModel
from speechprompt.tasks.classification import confusion
from speechprompt.tasks.ctc import CTCError
from speechprompt.tasks.evaluation import write_split_report


@torch.no_grad()
def evaluate_superb(model: SuperbModel, split: AudioSplit, batch_size: int = 16,
                    num_workers: int = 0) -> tuple[dict[str, float], list[str | None]]:
    """Metrics and predictions of ``model`` on ``split`` (the model is put in eval mode).

    Returns:
        ``{"loss", "accuracy"}`` or ``{"loss", "wer", "cer"}`` (the loss skips what the head cannot encode) over
        the readable utterances, plus ``n`` (how many) and ``unreadable`` (how many were skipped, see
        :func:`~speechprompt.superb.data.read_batches`); and one prediction per utterance in order, ``None`` for an
        unreadable one.

    Raises:
        AudioError: not one file of the split could be read.
    """
    model.eval()
    hyps: list[str | None] = [None] * len(split)
    loss_sum, loss_terms = 0.0, 0
    groups = [list(range(i, min(i + batch_size, len(split)))) for i in range(0, len(split), batch_size)]
    for batch in read_batches(split, groups, num_workers):
        if not batch.rows:
            continue
        output, frame_mask = model(*model.prepare(batch.wavs))
        for row, hyp in zip(batch.rows, model.head.decode(output, frame_mask)):
            hyps[row] = hyp
        try:
            total, terms = model.head.loss(output, frame_mask, batch.labels)
        except CTCError:  # a dev transcript with characters unseen in training: it still counts in WER/CER
            continue
        loss_sum, loss_terms = loss_sum + float(total), loss_terms + terms
    readable = [i for i in range(len(split)) if i not in split.unreadable]
    if not readable:
        raise AudioError(split.paths[0], f"no file of the split could be read ({len(split)} tried)")
    metrics = model.head.metrics([split.labels[i] for i in readable], [hyps[i] for i in readable])
    metrics["loss"] = loss_sum / loss_terms if loss_terms else float("nan")
    metrics["n"], metrics["unreadable"] = len(readable), len(split.unreadable)
    return metrics, hyps


def write_superb_report(model: SuperbModel, split: AudioSplit, name: str, metrics: dict[str, float],
                        hyps: list[str | None], out_dir: str | os.PathLike,
                        extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``OUT/<name>.metrics.json``, ``<name>.predictions.jsonl`` and, for a head with a class list,
    ``<name>.confusion.png`` (over the readable utterances); unreadable files are listed in the JSON with why.

    Returns what was written to the JSON file.
    """
    cm = None
    if model.head.labels is not None:
        read = [i for i, h in enumerate(hyps) if h is not None]
        matrix, names = confusion([split.labels[i] for i in read], [hyps[i] for i in read], model.head.labels)
        cm = (model.decoder, matrix, names, metrics["accuracy"])
    extra = dict(extra or {})
    if split.unreadable:  # reported, not hidden: their predictions are null
        extra["unreadable_files"] = {str(split.paths[i]): why for i, why in sorted(split.unreadable.items())}
    return write_split_report(out_dir, name, list(range(len(split))), split.labels, metrics, {model.decoder: hyps},
                              cm, extra)
