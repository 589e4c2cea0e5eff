"""Fluent Speech Commands: intent classification, the label being ``action|object|location``.

The official splits are ``data/{train,valid,test}_data.csv`` (``valid`` becomes our ``dev``). Each row names its
audio by a path relative to the dataset root (``wavs/speakers/<speaker>/<id>.wav``) and gives the three slots; the
label is the three joined by ``|`` (``activate|lights|kitchen``), which ``data.task=multislot`` splits again so
that each slot gets its own verbalizer token, as in SpeechPrompt. ``target=transcription`` writes the
transcription instead, for a sequence task.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from speechprompt.config import option
from speechprompt.data_prep.datasets.base import (
    DatasetError,
    Item,
    Listing,
    register_dataset,
    require_dir,
    require_file,
)

NAME = "fluent_commands"
SLOTS: tuple[str, ...] = ("action", "object", "location")
SPLIT_FILES = {"train": "train_data.csv", "dev": "valid_data.csv", "test": "test_data.csv"}
SEPARATOR = "|"

LAYOUT = """\
  ROOT/                       fluent_speech_commands_dataset as extracted
    data/train_data.csv, data/valid_data.csv, data/test_data.csv
        columns: (index), path, speakerId, transcription, action, object, location
    wavs/speakers/<speakerId>/<id>.wav   (the csv 'path' column is relative to ROOT)"""


@dataclass
class FluentCommandsOptions:
    """Options of the Fluent Speech Commands preparer."""

    target: Literal["intent", "transcription"] = option(
        "intent", help="label: 'intent' (action|object|location) or 'transcription' (the spoken text)"
    )


def read_rows(csv_path: Path) -> list[dict[str, str]]:
    """The rows of one split's CSV, checked to have the columns the labels need."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        needed = {"path", "transcription", *SLOTS}
        missing = sorted(needed - set(reader.fieldnames or []))
        if missing:
            raise DatasetError(f"{NAME}: {csv_path} lacks the column(s) {', '.join(missing)}; it has "
                               f"{reader.fieldnames}. Expected layout:\n{LAYOUT}")
        return list(reader)


def label_of(row: dict[str, str], target: str) -> str:
    if target == "transcription":
        return " ".join(row["transcription"].split())
    values = [row[slot].strip() for slot in SLOTS]
    for slot, value in zip(SLOTS, values):
        if SEPARATOR in value:
            raise DatasetError(f"{NAME}: the {slot} {value!r} contains the slot separator {SEPARATOR!r}")
    return SEPARATOR.join(values)


@register_dataset(NAME, FluentCommandsOptions, LAYOUT, task="multislot")
def build(root: Path, out: Path, opts: FluentCommandsOptions) -> Listing:
    """Fluent Speech Commands intents (action|object|location) on the official train/valid/test splits."""
    data = require_dir(root / "data", NAME, "the split CSVs")
    splits = {}
    for split, name in SPLIT_FILES.items():
        rows = read_rows(require_file(data / name, NAME, f"the {split} split"))
        splits[split] = [Item(root / row["path"], label_of(row, opts.target)) for row in rows]
    task = "multislot" if opts.target == "intent" else "sequence"
    # "task" overrides the registered one in summary.json: a transcription target is a sequence task.
    return Listing(splits, {"task": task,
                            "label_format": SEPARATOR.join(SLOTS) if task == "multislot" else "transcription"})
