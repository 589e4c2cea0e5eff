"""Evaluate a task checkpoint on a split: metrics JSON, predictions and a confusion-matrix PNG.

    speechprompt evaluate --checkpoint exp/run/best.safetensors --units units/test.units \\
        --labels data/test.labels --out exp/run/eval
    speechprompt evaluate --checkpoint exp/superb/ks_lora/best.safetensors --manifest data/test.tsv \\
        --labels data/test.labels --out exp/superb/ks_lora/eval

writes ``OUT/<split>.metrics.json`` (every metric of the task, per decoder, plus the confusion matrix),
``OUT/<split>.predictions.jsonl`` (one ``{"row", "label", "<decoder>": prediction}`` per utterance, in file
order) and, for classification, ``OUT/<split>.confusion.png``. The split name defaults to the input file's stem.
Several ``--units``/``--labels`` (or ``--manifest``/``--labels``) pairs evaluate several splits in one run (the
model is loaded once).

The checkpoint's sidecar says which input it takes. A unit-LM checkpoint (``speechprompt train``) reads units
(``--units``, made by ``speechprompt prepare``). A SUPERB checkpoint (``speechprompt superb``) reads audio
(``--manifest``, a fairseq TSV); its metrics are those of SUPERB training (accuracy, or WER and CER, and the loss)
and its predictions are under ``argmax`` (classification head) or ``greedy`` (CTC head).

The frozen base model (the unit LM, or the HuBERT upstream) is the one recorded in the checkpoint unless ``--base``
(alias ``--upstream``) names another path; its fingerprint must match either way.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

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

if TYPE_CHECKING:  # superb imports train, which imports this module
    from speechprompt.superb import SuperbModel

logger = logging.getLogger(__name__)


class Task(Protocol):
    """What the trainer and the evaluator need of a task (see :mod:`speechprompt.tasks.classification`)."""

    head: nn.Module | None
    labels: list[str]
    decoders: tuple[str, ...]
    default_metric: str

    def loss(self, batch: Batch) -> Tensor: ...

    def predict(self, batch: Batch) -> dict[str, list[str]]: ...

    def predict_with_loss(self, batch: Batch) -> tuple[dict[str, list[str]], Tensor]: ...

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
    """Write ``<split>.metrics.json``, ``<split>.predictions.jsonl`` and (classification) ``<split>.confusion.png``.

    The confusion matrix is the one of the task's default decoder. Returns what was written to the JSON file.
    """
    decoder = task.default_metric.split(".")[0]
    cm = task.confusion(split.labels, preds[decoder]) if decoder in preds else None
    confusion = (decoder, *cm, metrics.get(f"{decoder}.accuracy", 0.0)) if cm is not None else None
    return _write_files(out_dir, split.name, split.rows, split.labels, metrics, preds, confusion, extra)


def _write_files(
    out_dir: str | os.PathLike, name: str, rows: list[int], labels: list[str], metrics: dict,
    preds: dict[str, list], confusion: tuple[str, np.ndarray, list[str], float] | None, extra: dict | None,
) -> dict:
    """The report files of one split, for either checkpoint kind.

    Args:
        confusion: ``(decoder, matrix, class names, accuracy)`` of the decoder to plot, or ``None`` (no PNG).
    """
    from speechprompt.plots import plot_confusion_matrix

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


# --------------------------------------------------------------------------------------------------------------
# SUPERB checkpoints: HuBERT + tuning method + weighted layer sum + head, on audio


def is_superb_checkpoint(meta: dict[str, Any]) -> bool:
    """Whether a sidecar describes a SUPERB checkpoint (``speechprompt superb``) rather than a unit-LM one."""
    return str(meta.get("head") or "").startswith("superb_") or "superb" in meta


def checkpoint_kind(path: str | os.PathLike) -> str:
    """``"superb"`` or ``"unit_lm"``: which family a checkpoint belongs to, from its sidecar alone."""
    from speechprompt.checkpoint import read_sidecar

    return "superb" if is_superb_checkpoint(read_sidecar(path)) else "unit_lm"


def superb_decoder(model: SuperbModel) -> str:
    """The name a SUPERB head's predictions go under: ``argmax`` (classification) or ``greedy`` (CTC)."""
    from speechprompt.superb import ClassificationHead

    return "argmax" if isinstance(model.head, ClassificationHead) else "greedy"


def load_superb_model(
    path: str | os.PathLike, upstream: str | os.PathLike | None = None, device: str = "auto"
) -> SuperbModel:
    """:func:`speechprompt.superb.load_superb`, with the clear "not found" message of :func:`load_task`.

    Args:
        path: The checkpoint (``NAME``, ``NAME.safetensors`` or ``NAME.json``).
        upstream: The HuBERT checkpoint; default: the path recorded at training time (as given, else absolute).
        device: ``auto``, ``cpu``, ``cuda``, ...

    Returns:
        The :class:`~speechprompt.superb.SuperbModel`, in eval mode on ``device``.

    Raises:
        CheckpointError: no usable upstream, or one whose fingerprint differs from the one trained on.
    """
    from speechprompt.checkpoint import checkpoint_paths, read_sidecar
    from speechprompt.superb import load_superb

    recorded = read_sidecar(path).get("base") or {}
    candidates = [upstream] if upstream is not None else [recorded.get("path"), recorded.get("path_absolute")]
    found = next((c for c in candidates if c and Path(c).is_file()), None)
    if found is None:
        raise CheckpointError(
            f"{checkpoint_paths(path)[0]}: upstream HuBERT {candidates[0] or '(not recorded)'} not found; pass it "
            f"with --upstream (its fingerprint must be {recorded.get('fingerprint')})"
        )
    return load_superb(path, upstream=found, device=resolve_device(device))


# --------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="task checkpoint (NAME.safetensors with NAME.json beside)")
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--units", nargs="+", help="units file(s) of the split(s) to evaluate (unit-LM checkpoints)")
    inputs.add_argument("--manifest", nargs="+",
                        help="audio manifest(s) (fairseq TSV) of the split(s) to evaluate (SUPERB checkpoints)")
    parser.add_argument("--labels", required=True, nargs="+",
                        help="labels file(s), one per --units or --manifest file, line-aligned with it")
    parser.add_argument("--names", nargs="+", default=None, help="split names (default: the input files' stems)")
    parser.add_argument("--out", default=None, help="output directory (default: the checkpoint's directory)")
    parser.add_argument("--base", "--upstream", dest="base", metavar="PATH", default=None,
                        help="the frozen base model: the unit LM of a unit-LM checkpoint, the HuBERT upstream of a "
                        "SUPERB checkpoint (default: the path recorded in the checkpoint; its fingerprint is "
                        "checked either way)")
    parser.add_argument("--batch-size", type=int, default=32, help="utterances per batch")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def _splits(args: argparse.Namespace, inputs: list[str]) -> list[tuple[str, str, str]]:
    """``(name, input file, labels file)`` per split, checking that the lists line up."""
    if len(inputs) != len(args.labels):
        flag = "--units" if args.units else "--manifest"
        raise SpeechPromptError(f"{len(inputs)} {flag} files but {len(args.labels)} --labels files")
    if args.names is not None and len(args.names) != len(inputs):
        raise SpeechPromptError(f"{len(args.names)} --names for {len(inputs)} splits")
    names = args.names or [Path(x).stem for x in inputs]
    return list(zip(names, inputs, args.labels))


def _evaluate_unit_lm(args: argparse.Namespace) -> int:
    if args.manifest:
        raise SpeechPromptError(
            f"{args.checkpoint} is a unit-LM checkpoint: it reads units, not audio; pass --units files made from "
            "the manifest by `speechprompt prepare` (with the quantizer recorded in the checkpoint)"
        )
    splits = _splits(args, args.units)
    task, ckpt, dictionary = load_task(args.checkpoint, args.base, args.device)
    device = resolve_device(args.device)
    max_len = (ckpt.meta.get("units") or {}).get("max_len")
    out_dir = Path(args.out) if args.out else ckpt.path.parent
    for name, units, labels in splits:
        split = load_split(units, labels, len(dictionary) - dictionary.nspecial, max_len, name=name)
        metrics, preds = evaluate_split(task, split, args.batch_size, device)
        write_report(task, split, metrics, preds, out_dir, {"checkpoint": str(ckpt.path)})
        print(json.dumps({"split": name, **metrics}))
    return 0


def _evaluate_superb(args: argparse.Namespace) -> int:
    from speechprompt.checkpoint import checkpoint_paths
    from speechprompt.superb import ClassificationHead, evaluate_superb, load_audio_split
    from speechprompt.tasks.classification import confusion

    if args.units:
        raise SpeechPromptError(
            f"{args.checkpoint} is a SUPERB checkpoint: it reads audio, not units; pass --manifest (the audio "
            "manifest the units were made from) instead of --units"
        )
    splits = _splits(args, args.manifest)
    model = load_superb_model(args.checkpoint, args.base, args.device)
    decoder = superb_decoder(model)
    ckpt_path = checkpoint_paths(args.checkpoint)[0]
    out_dir = Path(args.out) if args.out else ckpt_path.parent
    for name, manifest, labels in splits:
        split = load_audio_split(manifest, labels)
        metrics, hyps = evaluate_superb(model, split, args.batch_size)
        cm = None
        if isinstance(model.head, ClassificationHead):
            read = [i for i, h in enumerate(hyps) if h is not None]
            matrix, names = confusion([split.labels[i] for i in read], [hyps[i] for i in read], model.head.labels)
            cm = (decoder, matrix, names, metrics["accuracy"])
        extra = {"checkpoint": str(ckpt_path)}
        if split.unreadable:  # reported, not hidden: their predictions are null
            extra["unreadable_files"] = {str(split.paths[i]): why for i, why in sorted(split.unreadable.items())}
        _write_files(out_dir, name, list(range(len(split))), split.labels, metrics, {decoder: hyps}, cm, extra)
        print(json.dumps({"split": name, **metrics}))
    return 0


# Checkpoint family (see :func:`checkpoint_kind`) -> how it is evaluated.
EVALUATORS = {"unit_lm": _evaluate_unit_lm, "superb": _evaluate_superb}


def run(args: argparse.Namespace) -> int:
    return EVALUATORS[checkpoint_kind(args.checkpoint)](args)
