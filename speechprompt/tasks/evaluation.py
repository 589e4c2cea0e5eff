"""Scoring a task on a split, and the report files every evaluation writes.

``<split>.metrics.json`` (every metric, per decoder, with the confusion matrix when there is one),
``<split>.predictions.jsonl`` (one ``{"row", "label", "<decoder>": prediction}`` per utterance, in file order) and,
for classification, ``<split>.confusion.png``. Unit-LM tasks and SUPERB models write the same files.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from speechprompt.fileio import atomic_open, write_json
from speechprompt.plots import plot_confusion_matrix
from speechprompt.tasks.data import Split, batches
from speechprompt.tasks.registry import Task


@torch.no_grad()
def evaluate_split(task: Task, split: Split, batch_size: int, device: torch.device) -> tuple[dict, dict]:
    """Predict every utterance of ``split`` and score it.

    Returns:
        ``(metrics, predictions)``: metrics as ``{"<decoder>.<metric>": value, "loss": mean loss, "n": count}``;
        predictions as ``{decoder: [prediction per utterance, in split order]}``.
    """
    verbalizer = getattr(task, "verbalizer", None)
    preds: dict[str, list[str | None]] = {}
    loss_sum, loss_n = 0.0, 0
    for batch in batches(split, verbalizer, batch_size):
        batch = batch.to(device)
        batch_preds, batch_loss = task.predict_with_loss(batch)
        for decoder, hyps in batch_preds.items():
            slot = preds.setdefault(decoder, [None] * len(split))
            for i, hyp in zip(batch.index.tolist(), hyps):
                slot[i] = hyp
        loss = float(batch_loss)
        if math.isfinite(loss):  # a batch of only unseen labels has no target to score
            loss_sum, loss_n = loss_sum + loss * len(batch), loss_n + len(batch)
    metrics = task.metrics(split.labels, preds)
    metrics["loss"] = loss_sum / loss_n if loss_n else float("nan")
    metrics["n"] = len(split)
    return metrics, preds


def write_report(
    task: Task, split: Split, metrics: dict, preds: dict, out_dir: str | os.PathLike, extra: dict | None = None
) -> dict:
    """The report files of ``split`` (see the module docstring); the confusion matrix is the default decoder's.

    Returns what was written to the JSON file.
    """
    decoder = task.default_metric.split(".")[0]
    cm = task.confusion(split.labels, preds[decoder]) if decoder in preds else None
    confusion = (decoder, *cm, metrics.get(f"{decoder}.accuracy", 0.0)) if cm is not None else None
    return write_split_report(out_dir, split.name, split.rows, split.labels, metrics, preds, confusion, extra)


def write_split_report(
    out_dir: str | os.PathLike, name: str, rows: list[int], labels: list[str], metrics: dict,
    preds: dict[str, list], confusion: tuple[str, np.ndarray, list[str], float] | None, extra: dict | None,
) -> dict:
    """The report files of one split, for any model kind.

    Args:
        rows: each utterance's row in the input files.
        confusion: ``(decoder, matrix, class names, accuracy)`` of the decoder to plot, or ``None`` (no PNG).
        extra: more fields for the metrics JSON (the checkpoint, unreadable files, ...).
    """
    out = Path(out_dir)
    report = {"split": name, **metrics, **(extra or {})}
    if confusion is not None:
        decoder, matrix, names, acc = confusion
        report["confusion"] = {"decoder": decoder, "labels": names, "matrix": matrix.tolist()}
        plot_confusion_matrix(matrix, names, out / f"{name}.confusion.png",
                              title=f"{name}: {decoder} (accuracy {acc:.3f})")
    write_json(out / f"{name}.metrics.json", report)
    with atomic_open(out / f"{name}.predictions.jsonl", "w", encoding="utf-8") as f:
        for i, (row, label) in enumerate(zip(rows, labels)):
            f.write(json.dumps({"row": row, "label": label, **{d: p[i] for d, p in preds.items()}}) + "\n")
    return report
