"""Evaluate a task checkpoint on a split: metrics JSON, predictions and a confusion-matrix PNG.

    speechprompt evaluate --checkpoint exp/run/best.safetensors --units units/test.units \\
        --labels data/test.labels --out exp/run/eval

writes ``OUT/<split>.metrics.json`` (every metric of the task, per decoder, plus the confusion matrix),
``OUT/<split>.predictions.jsonl`` (one ``{"row", "label", "<decoder>": prediction}`` per utterance, in file
order) and, for classification, ``OUT/<split>.confusion.png``. The split name defaults to the units file's stem.
Several ``--units``/``--labels`` pairs evaluate several splits in one run (the model is loaded once).

The base unit LM is the one recorded in the checkpoint unless ``--base`` names another path; its fingerprint
must match either way.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

import speechprompt.baselines  # noqa: F401  (registers full_finetune and linear_probe as methods)
from speechprompt.checkpoint import TaskCheckpoint, base_fingerprint, load_checkpoint, load_into
from speechprompt.devices import resolve_device
from speechprompt.errors import CheckpointError, SpeechPromptError
from speechprompt.fileio import atomic_open, write_json
from speechprompt.tasks.data import Batch, Split, batches, load_split
from speechprompt.tuning import build_method, freeze_except, method_config
from speechprompt.verbalizers import Verbalizer, verbalizer_from_dict

logger = logging.getLogger(__name__)


class Task(Protocol):
    """What the trainer and the evaluator need of a task (see :mod:`speechprompt.tasks.classification`)."""

    head: nn.Module | None
    labels: list[str]
    decoders: tuple[str, ...]
    default_metric: str

    def loss(self, batch: Batch) -> Tensor: ...

    def predict(self, batch: Batch) -> dict[str, list[str]]: ...

    def metrics(self, refs: list[str], preds: dict[str, list[str]]) -> dict[str, float]: ...

    def confusion(self, refs: list[str], hyps: list[str]) -> tuple[np.ndarray, list[str]] | None: ...


def _verbalized(model, method, verbalizer, labels, decode):
    from speechprompt.tasks.classification import VerbalizedClassifier

    return VerbalizedClassifier(model, method, verbalizer)


def _learnable(model, method, verbalizer, labels, decode):
    from speechprompt.tasks.classification import LearnableClassifier

    return LearnableClassifier(model, method, verbalizer)


def _sequence(model, method, verbalizer, labels, decode):
    from speechprompt.tasks.generation import SequenceTask

    return SequenceTask(model, method, verbalizer, **decode)


def _probe(model, method, verbalizer, labels, decode):
    from speechprompt.baselines import LinearProbe

    return LinearProbe(model, method, labels)


# How predictions are made -> builder(model, method, verbalizer, labels, decode options).
TASK_KINDS = {"verbalized": _verbalized, "learnable": _learnable, "sequence": _sequence, "linear_probe": _probe}


def task_kind(task_type: str, verbalizer_kind: str | None, method: str) -> str:
    """The task head for a task type, verbalizer kind and method name (a key of :data:`TASK_KINDS`)."""
    if method == "linear_probe":
        if task_type == "sequence":
            raise SpeechPromptError("the linear probe classifies; it cannot be used for a sequence task")
        return "linear_probe"
    if task_type == "sequence":
        return "sequence"
    return "learnable" if verbalizer_kind == "learnable" else "verbalized"


def build_task(
    kind: str, model: nn.Module, method: nn.Module, verbalizer: Verbalizer | None, labels: list[str],
    decode: dict[str, Any] | None = None,
) -> Task:
    """Instantiate the task head ``kind`` (a key of :data:`TASK_KINDS`)."""
    return TASK_KINDS[kind](model, method, verbalizer, labels, dict(decode or {}))


def load_task(
    path: str | os.PathLike, base: str | os.PathLike | None = None, device: str = "auto"
) -> tuple[Task, TaskCheckpoint, Any]:
    """Rebuild a trained task from its checkpoint: base LM (fingerprint-checked), method, verbalizer and head.

    Args:
        path: The checkpoint (``NAME``, ``NAME.safetensors`` or ``NAME.json``).
        base: The base unit LM; default: the path recorded at training time.
        device: ``auto``, ``cpu``, ``cuda``, ...

    Returns:
        The task (model in eval mode on ``device``), the loaded checkpoint and the LM's dictionary.
    """
    from speechprompt.models.unit_lm import load_unit_lm

    ckpt = load_checkpoint(path)
    meta = ckpt.meta
    recorded = meta.get("base", {})
    candidates = [base] if base is not None else [recorded.get("path"), recorded.get("abs_path")]
    base_path = next((Path(c) for c in candidates if c and Path(c).is_file()), Path(candidates[0] or ""))
    if not base_path.is_file():
        raise CheckpointError(
            f"{ckpt.path}: base unit LM {str(base_path) or '(not recorded)'} not found; pass it with --base "
            f"(its fingerprint must be {meta.get('base', {}).get('fingerprint')})"
        )
    model, dictionary = load_unit_lm(base_path)
    ckpt.check_base(base_fingerprint(model), base_path)
    name = meta["method"]["name"]
    method = build_method(method_config(name, meta["method"].get("config")), model)
    try:
        method.load_exported_state_dict(ckpt.method_state)
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{ckpt.path}: method tensors do not fit method {name!r} ({e})") from None
    freeze_except(model, method)
    verbalizer = verbalizer_from_dict(meta["verbalizer"]) if meta.get("verbalizer") else None
    if verbalizer is not None:
        verbalizer.check_vocab(len(dictionary))
    task_meta = meta["task"]
    task = build_task(task_meta["kind"], model, method, verbalizer, task_meta.get("labels", []),
                      task_meta.get("decode"))
    if task.head is not None:
        load_into(task.head, ckpt.head_state, "head", ckpt.path)
    dev = resolve_device(device)
    for module in (model, method, task.head):
        if module is not None:
            module.to(dev).eval()
    return task, ckpt, dictionary


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
        for decoder, hyps in task.predict(batch).items():
            slot = preds.setdefault(decoder, [None] * len(split))
            for i, hyp in zip(batch.index.tolist(), hyps):
                slot[i] = hyp
        loss = float(task.loss(batch))
        if math.isfinite(loss):  # a batch of only unseen labels has no target to score
            loss_sum, loss_n = loss_sum + loss * len(batch), loss_n + len(batch)
    metrics = task.metrics(split.labels, preds)
    metrics["loss"] = loss_sum / loss_n if loss_n else float("nan")
    metrics["n"] = len(split)
    return metrics, preds


def write_report(
    task: Task, split: Split, metrics: dict, preds: dict, out_dir: str | os.PathLike, extra: dict | None = None
) -> dict:
    """Write ``<split>.metrics.json``, ``<split>.predictions.jsonl`` and (classification) ``<split>.confusion.png``.

    The confusion matrix is the one of the task's default decoder. Returns what was written to the JSON file.
    """
    from speechprompt.plots import plot_confusion_matrix

    out = Path(out_dir)
    report = {"split": split.name, **metrics, **(extra or {})}
    decoder = task.default_metric.split(".")[0]
    cm = task.confusion(split.labels, preds[decoder]) if decoder in preds else None
    if cm is not None:
        matrix, names = cm
        report["confusion"] = {"decoder": decoder, "labels": names, "matrix": matrix.tolist()}
        plot_confusion_matrix(matrix, names, out / f"{split.name}.confusion.png",
                              title=f"{split.name}: {decoder} (accuracy {metrics.get(f'{decoder}.accuracy', 0):.3f})")
    write_json(out / f"{split.name}.metrics.json", report)
    with atomic_open(out / f"{split.name}.predictions.jsonl", "w", encoding="utf-8") as f:
        for i, (row, label) in enumerate(zip(split.rows, split.labels)):
            f.write(json.dumps({"row": row, "label": label, **{d: p[i] for d, p in preds.items()}}) + "\n")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="task checkpoint (NAME.safetensors with NAME.json beside)")
    parser.add_argument("--units", required=True, nargs="+", help="units file(s) of the split(s) to evaluate")
    parser.add_argument("--labels", required=True, nargs="+", help="labels file(s), one per --units file")
    parser.add_argument("--names", nargs="+", default=None, help="split names (default: the units files' stems)")
    parser.add_argument("--out", default=None, help="output directory (default: the checkpoint's directory)")
    parser.add_argument("--base", default=None, help="base unit LM (default: the path recorded in the checkpoint)")
    parser.add_argument("--batch-size", type=int, default=32, help="utterances per batch")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def run(args: argparse.Namespace) -> int:
    if len(args.units) != len(args.labels):
        raise SpeechPromptError(f"{len(args.units)} --units files but {len(args.labels)} --labels files")
    if args.names is not None and len(args.names) != len(args.units):
        raise SpeechPromptError(f"{len(args.names)} --names for {len(args.units)} splits")
    task, ckpt, dictionary = load_task(args.checkpoint, args.base, args.device)
    device = resolve_device(args.device)
    max_len = (ckpt.meta.get("units") or {}).get("max_len")
    out_dir = Path(args.out) if args.out else ckpt.path.parent
    results = {}
    for i, (units, labels) in enumerate(zip(args.units, args.labels)):
        name = args.names[i] if args.names else Path(units).stem
        split = load_split(units, labels, len(dictionary) - dictionary.nspecial, max_len, name=name)
        metrics, preds = evaluate_split(task, split, args.batch_size, device)
        write_report(task, split, metrics, preds, out_dir, {"checkpoint": str(ckpt.path)})
        results[name] = {k: v for k, v in metrics.items()}
        print(json.dumps({"split": name, **results[name]}))
    return 0
