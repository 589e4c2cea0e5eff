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
from pathlib import Path

from speechprompt.checkpoint import checkpoint_kind, checkpoint_paths
from speechprompt.devices import resolve_device
from speechprompt.errors import SpeechPromptError
from speechprompt.superb import evaluate_superb, load_audio_split, load_superb, write_superb_report
from speechprompt.tasks.data import load_split
from speechprompt.tasks.evaluation import evaluate_split, write_report
from speechprompt.tasks.loading import load_task


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
    task, ckpt, vocab = load_task(args.checkpoint, args.base, args.device)
    device = resolve_device(args.device)
    max_len = (ckpt.meta.get("units") or {}).get("max_len")
    out_dir = Path(args.out) if args.out else ckpt.path.parent
    for name, units, labels in splits:
        split = load_split(units, labels, vocab, max_len, name=name)
        metrics, preds = evaluate_split(task, split, args.batch_size, device)
        write_report(task, split, metrics, preds, out_dir, {"checkpoint": str(ckpt.path)})
        print(json.dumps({"split": name, **metrics}))
    return 0


def _evaluate_superb(args: argparse.Namespace) -> int:
    if args.units:
        raise SpeechPromptError(
            f"{args.checkpoint} is a SUPERB checkpoint: it reads audio, not units; pass --manifest (the audio "
            "manifest the units were made from) instead of --units"
        )
    splits = _splits(args, args.manifest)
    model = load_superb(args.checkpoint, args.base, resolve_device(args.device))
    ckpt_path = checkpoint_paths(args.checkpoint)[0]
    out_dir = Path(args.out) if args.out else ckpt_path.parent
    for name, manifest, labels in splits:
        split = load_audio_split(manifest, labels)
        metrics, hyps = evaluate_superb(model, split, args.batch_size)
        write_superb_report(model, split, name, metrics, hyps, out_dir, {"checkpoint": str(ckpt_path)})
        print(json.dumps({"split": name, **metrics}))
    return 0


# Checkpoint family (see :func:`speechprompt.checkpoint.checkpoint_kind`) -> how it is evaluated.
EVALUATORS = {"unit_lm": _evaluate_unit_lm, "superb": _evaluate_superb}


def run(args: argparse.Namespace) -> int:
    return EVALUATORS[checkpoint_kind(args.checkpoint)](args)
