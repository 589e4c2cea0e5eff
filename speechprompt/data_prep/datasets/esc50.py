"""ESC-50 environmental sound classification: 2,000 five-second clips, 50 classes, five folds.

``meta/esc50.csv`` gives every clip's ``filename`` (under ``audio/``), ``fold`` (1-5), ``target`` (0-49),
``category`` (``dog``, ``rain`` ...), ``esc10``, ``src_file`` and ``take``; clips of one source recording share a
fold, so the folds are the dataset's own cross-validation (AST, AAT: train on four folds, test on the fifth, report
the mean over the five).

Fold ``k`` writes ``test`` (fold ``k``) and ``train`` (the others). AST and AAT have no dev split (they report the
held-out fold after a fixed number of epochs); ``dev_fold`` moves one more fold out of training into ``dev`` for
model selection. The label is the category name (``label=target`` gives the number); ``esc10=true`` keeps the
ESC-10 subset only.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from speechprompt.config import ConfigError, option
from speechprompt.data_prep.datasets.base import (
    DatasetError,
    Item,
    Listing,
    register_dataset,
    require_dir,
    require_file,
)

NAME = "esc50"
FOLDS = 5
COLUMNS = ("filename", "fold", "target", "category", "esc10")

LAYOUT = """\
  ROOT/                       ESC-50-master as extracted
    meta/esc50.csv            columns: filename, fold, target, category, esc10, src_file, take
    audio/<fold>-<source>-<take>-<target>.wav   (5 s, 44.1 kHz)"""


@dataclass
class Esc50Options:
    """Options of the ESC-50 preparer."""

    fold: int = option(1, help="the test fold (1-5); the others train")
    dev_fold: int | None = option(None, help="a training fold held out as dev (null: no dev split, as AST/AAT)")
    label: Literal["category", "target"] = option("category", help="label: the class name or its number")
    esc10: bool = option(False, help="keep only the ESC-10 subset (10 classes)")

    def __post_init__(self) -> None:
        if not 1 <= self.fold <= FOLDS:
            raise ConfigError(f"fold must be 1-{FOLDS}, got {self.fold}")
        if self.dev_fold is not None and (not 1 <= self.dev_fold <= FOLDS or self.dev_fold == self.fold):
            raise ConfigError(f"dev_fold must be 1-{FOLDS} and not the test fold {self.fold}, got {self.dev_fold}")


def read_meta(path: Path) -> list[dict[str, str]]:
    """The rows of ``esc50.csv``, checked for the columns and fold numbers the split needs."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{NAME}: {path} lacks the column(s) {', '.join(missing)}; it has "
                               f"{reader.fieldnames}. Expected layout:\n{LAYOUT}")
        rows = list(reader)
    for n, row in enumerate(rows, start=2):
        if row["fold"] not in {str(k) for k in range(1, FOLDS + 1)}:
            raise DatasetError(f"{NAME}: {path}:{n}: fold {row['fold']!r} is not 1-{FOLDS}")
    if not rows:
        raise DatasetError(f"{NAME}: {path} lists no clip")
    return rows


@register_dataset(NAME, Esc50Options, LAYOUT, task="classification")
def build(root: Path, out: Path, opts: Esc50Options) -> Listing:
    """ESC-50 (50 classes, 5 folds): test on fold `fold`, train on the others (AST / AAT)."""
    rows = read_meta(require_file(root / "meta" / "esc50.csv", NAME, "the clip list"))
    audio = require_dir(root / "audio", NAME, "the clips")
    if opts.esc10:
        rows = [r for r in rows if r["esc10"].strip().lower() == "true"]
    splits: dict[str, list[Item]] = {"train": [], "test": []}
    if opts.dev_fold is not None:
        splits["dev"] = []
    for row in rows:
        fold = int(row["fold"])
        split = "test" if fold == opts.fold else "dev" if fold == opts.dev_fold else "train"
        splits[split].append(Item(audio / row["filename"], row[opts.label].strip()))
    listed = {r["filename"] for r in rows}
    unlisted = sorted(p.name for p in audio.glob("*.wav") if p.name not in listed) if not opts.esc10 else []
    notes = {"fold": opts.fold, "dev_fold": opts.dev_fold, "classes": len({r[opts.label] for r in rows})}
    if unlisted:
        notes["unlisted_audio"] = unlisted
    return Listing(splits, notes)
