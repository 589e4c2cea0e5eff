"""Prepare a public dataset as manifests and labels: Speech Commands, Fluent Speech Commands, LibriSpeech, SNIPS.

Writes ``OUT/{train,dev,test}.tsv`` (fairseq manifests: the root, then ``relpath<TAB>num_samples``),
``OUT/{train,dev,test}.labels`` (one label per line, in manifest order) and ``OUT/summary.json`` (utterances,
label counts, and every file left out with the reason). The next step is ``speechprompt prepare`` on each
manifest. Nothing is downloaded: ROOT is the dataset as you extracted it, in the layout shown below.

Files whose header cannot be read, or that hold no samples, are left out and listed; the rest go on.

Examples::

    speechprompt prepare-dataset speech_commands --root data/speech_commands_v0.01 --out data/ks
    speechprompt prepare-dataset librispeech --root data/LibriSpeech --out data/asr test=[test-clean,test-other]
    speechprompt prepare-dataset snips --root data/SNIPS --out data/sf lowercase=true

From Python: ``prepare("snips", root, out, lowercase=True)``.
"""

from __future__ import annotations

import argparse
import json

from speechprompt.config import apply_overrides, describe
from speechprompt.data_prep.datasets import fluent_commands, librispeech, snips, speech_commands  # noqa: F401
from speechprompt.data_prep.datasets.base import (
    DATASETS,
    SPLITS,
    SUMMARY_FILE,
    DatasetError,
    DatasetSpec,
    Item,
    Listing,
    get_dataset,
    prepare,
    register_dataset,
    write_split,
)

__all__ = [
    "DATASETS",
    "SPLITS",
    "SUMMARY_FILE",
    "DatasetError",
    "DatasetSpec",
    "Item",
    "Listing",
    "get_dataset",
    "prepare",
    "register_dataset",
    "write_split",
]


def _epilog() -> str:
    parts = []
    for spec in DATASETS.values():
        parts.append(f"{spec.name}: {spec.summary_line}\n{spec.layout}\n  options (key=value):\n"
                     + describe(spec.options, prefix="  "))
    return "\n\n".join(parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=list(DATASETS), help="which dataset ROOT holds")
    parser.add_argument("--root", required=True, help="the dataset as extracted (layouts below)")
    parser.add_argument("--out", required=True, help="output directory for the manifests, labels and summary")
    parser.add_argument("options", nargs="*", metavar="KEY=VALUE",
                        help="options of the dataset (below), e.g. lowercase=true or test=[test-clean,test-other]")
    parser.epilog = _epilog()


def run(args: argparse.Namespace) -> int:
    summary = prepare(args.dataset, args.root, args.out, **apply_overrides({}, args.options))
    for split, stats in summary["splits"].items():
        skipped = f", {stats['skipped']} files left out" if stats["skipped"] else ""
        print(f"{args.out}/{split}.tsv: {stats['utterances']} utterances{skipped}")
    if summary["skipped"]:
        print(f"the files left out and why: {args.out}/{SUMMARY_FILE} (\"skipped\")")
    print(json.dumps({s: v["utterances"] for s, v in summary["splits"].items()}))
    return 0
