"""Score unit inventories with a cheap bag-of-units probe on a labelled corpus, and pick the best one.

For each candidate (a folder of ``<split>.units`` files, one line per manifest row, as ``speechprompt prepare``
writes them), a logistic regression on each utterance's unit histogram (the fraction of its units per unit, and per
bigram of the deduplicated sequence) is trained on ``train`` and scored on every other split found. It takes
seconds, so a recipe can use it to choose the units (a layer of a HuBERT, or MFCC k-means) on ``dev`` before
spending minutes on a unit LM. Also reported: units per second after merging repeats (when the manifests are
given), and the perplexity of the unit distribution (how many units are really used).

Example:
    speechprompt units-probe --labels exp/data/commands mfcc_cmn=exp/u_mfcc hubert_L4=exp/u_L4 \\
        --choose dev --out exp/units_choice.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import numpy as np

from speechprompt.errors import SpeechPromptError
from speechprompt.fileio import atomic_open

logger = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test", "test_synth")


class UnitsProbeError(SpeechPromptError):
    """Unit or label files that are missing, or that do not line up."""


def read_units(path: Path) -> list[list[int]]:
    """One list of unit ids per line of ``path`` (an empty line is an utterance without units)."""
    return [[int(u) for u in line.split()] for line in path.read_text().splitlines()]


def _dedup(units: list[int]) -> list[int]:
    return [u for j, u in enumerate(units) if j == 0 or u != units[j - 1]]


def histogram(rows: list[list[int]], k: int) -> np.ndarray:
    """Bag-of-units features of utterances.

    Args:
        rows: N unit sequences, ids in ``[0, k)``.
        k: the number of units.

    Returns:
        ``(N, k + k * k)``: each row's unit fractions, then its deduplicated-bigram fractions (each part sums to 1,
        or to 0 for an utterance too short to have any).
    """
    out = np.zeros((len(rows), k + k * k))
    for i, units in enumerate(rows):
        if not units:
            continue
        np.add.at(out[i], units, 1.0 / len(units))
        dedup = _dedup(units)
        if len(dedup) > 1:
            pairs = k + np.array(dedup[:-1]) * k + np.array(dedup[1:])
            np.add.at(out[i], pairs, 1.0 / (len(dedup) - 1))
    return out


def manifest_seconds(path: Path, sample_rate: int = 16000) -> float:
    """Total audio duration of a manifest (root line, then ``relpath<TAB>num_samples``)."""
    return sum(int(line.split("\t")[1]) for line in path.read_text().splitlines()[1:] if line.strip()) / sample_rate


def probe(units_dir: Path, labels_dir: Path, seconds: float | None = None, c: float = 10.0) -> dict[str, float]:
    """Train the probe on ``units_dir/train.units`` and score it on every other split found there.

    Args:
        units_dir: folder with ``<split>.units``; ``train`` is required.
        labels_dir: folder with ``<split>.labels``, one label per line, in the units' order.
        seconds: audio duration of the training split, for ``dedup_units_per_second`` (left out when None).
        c: inverse L2 strength of the logistic regression.

    Returns:
        ``<split>_accuracy`` for each split but train, ``unit_perplexity`` and possibly ``dedup_units_per_second``.
    """
    rows = {s: read_units(units_dir / f"{s}.units") for s in SPLITS if (units_dir / f"{s}.units").is_file()}
    if "train" not in rows:
        raise UnitsProbeError(f"{units_dir / 'train.units'} not found: the probe is trained on it")
    labels = {}
    for split, units in rows.items():
        path = labels_dir / f"{split}.labels"
        if not path.is_file():
            raise UnitsProbeError(f"{path} not found (the labels of {units_dir / split}.units)")
        labels[split] = np.array(path.read_text().splitlines())
        if len(labels[split]) != len(units):
            raise UnitsProbeError(f"{path} has {len(labels[split])} lines but {units_dir / split}.units has "
                                  f"{len(units)}: they must be of the same manifest")
    # sklearn is imported here, not at the top: every `speechprompt` command imports this module to list its help
    from sklearn.linear_model import LogisticRegression

    k = 1 + max((u for split in rows.values() for units in split for u in units), default=0)
    feats = {s: histogram(r, k) for s, r in rows.items()}
    clf = LogisticRegression(max_iter=3000, C=c).fit(feats["train"], labels["train"])
    out = {f"{s}_accuracy": float(np.mean(clf.predict(feats[s]) == labels[s])) for s in rows if s != "train"}
    counts = np.bincount([u for units in rows["train"] for u in units], minlength=k).astype(float)
    p = counts[counts > 0] / counts.sum()
    out["unit_perplexity"] = float(math.exp(-(p * np.log(p)).sum()))
    if seconds:
        out["dedup_units_per_second"] = sum(len(_dedup(u)) for u in rows["train"]) / seconds
    return out


def choose(results: dict[str, dict[str, float]], split: str) -> str:
    """The candidate with the best accuracy on ``split``; a tie goes to the one named first (the baseline)."""
    key = f"{split}_accuracy"
    missing = [name for name, r in results.items() if key not in r]
    if missing:
        raise UnitsProbeError(f"no {split}.units for {', '.join(missing)}: cannot choose on {split}")
    return max(results, key=lambda name: results[name][key])  # max keeps the first of equal scores


def _candidate(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, Path(folder)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("candidates", nargs="+", type=_candidate, metavar="NAME=DIR",
                        help="unit folders (<split>.units); the first is the baseline, which wins ties")
    parser.add_argument("--labels", type=Path, required=True,
                        help="folder with <split>.labels (and <split>.tsv, for the units per second)")
    parser.add_argument("--choose", default=None, metavar="SPLIT",
                        help="pick the candidate with the best accuracy on SPLIT and print only its name")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the scores (and the choice) to this JSON file")
    parser.add_argument("--C", dest="c", type=float, default=10.0, help="inverse L2 strength of the regression")


def run(args: argparse.Namespace) -> int:
    names = [name for name, _ in args.candidates]
    if len(set(names)) != len(names):
        raise UnitsProbeError(f"candidate names must differ: {', '.join(names)}")
    for name, folder in args.candidates:
        if not folder.is_dir():
            raise UnitsProbeError(f"unit folder of {name} not found: {folder}")
    tsv = args.labels / "train.tsv"
    seconds = manifest_seconds(tsv) if tsv.is_file() else None
    results = {name: probe(folder, args.labels, seconds, args.c) for name, folder in args.candidates}
    report: dict = {"baseline": names[0], "results": results}
    if args.choose:
        report["split"] = args.choose
        report["chosen"] = choose(results, args.choose)
        for name in names:
            logger.info("%-16s %s accuracy %.3f%s", name, args.choose, results[name][f"{args.choose}_accuracy"],
                        "  <- chosen" if name == report["chosen"] else "")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(args.out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    print(report["chosen"] if args.choose else json.dumps(report))
    return 0
