"""Prepare a public dataset as manifests and labels: Speech Commands, Fluent Speech Commands, LibriSpeech, SNIPS,
VoxCeleb1, IEMOCAP, Libri-light, ESC-50.

Writes ``OUT/{train,dev,test}.tsv`` (or the dataset's own splits: fairseq manifests, the root then
``relpath<TAB>num_samples``), ``OUT/{train,dev,test}.labels`` (one label per line, in manifest order) and
``OUT/summary.json`` (utterances, label counts, and every file left out with the reason). The next step is
``speechprompt prepare`` (units) or ``speechprompt superb`` (audio) on each manifest. Nothing is downloaded: ROOT
is the dataset as you extracted it, in the layout shown below.

Files whose header cannot be read, or that hold no samples, are left out and listed; the rest go on.

Examples::

    speechprompt prepare-dataset speech_commands --root data/speech_commands_v0.01 --out data/ks
    speechprompt prepare-dataset librispeech --root data/LibriSpeech --out data/asr test=[test-clean,test-other]
    speechprompt prepare-dataset snips --root data/SNIPS --out data/sf lowercase=true
    speechprompt prepare-dataset iemocap --root data/IEMOCAP_full_release --out data/er/fold1 fold=1
    speechprompt prepare-dataset librilight --root data/librispeech_finetuning --out data/ll10h subset=10h

From Python: ``prepare("snips", root, out, lowercase=True)``.
"""

from __future__ import annotations

import argparse
import json

from speechprompt.config import apply_overrides, describe
from speechprompt.data_prep.datasets import (  # noqa: F401  (each registers its dataset)
    esc50,
    fluent_commands,
    iemocap,
    librilight,
    librispeech,
    snips,
    speech_commands,
    voxceleb1,
)
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


def _options_help(spec: DatasetSpec) -> str:
    return f"expected layout:\n{spec.layout}\n\noptions (KEY=VALUE):\n{describe(spec.options)}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # One sub-parser per dataset, so that `prepare-dataset snips --help` shows SNIPS's layout and options, and
    # KEY=VALUE options may come before or after --root/--out.
    sub = parser.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    for spec in DATASETS.values():
        p = sub.add_parser(spec.name, help=spec.summary_line, description=spec.summary_line,
                           epilog=_options_help(spec), formatter_class=parser.formatter_class)
        p.add_argument("--root", required=True, help="the dataset as extracted (layout below)")
        p.add_argument("--out", required=True, help="output directory for the manifests, labels and summary")
        p.add_argument("options", nargs="*", metavar="KEY=VALUE", help="options of the dataset (below)")
    parser.epilog = "\n\n".join(f"{spec.name}: {spec.summary_line}\n{spec.layout}" for spec in DATASETS.values()) \
        + "\n\nEach dataset's options: speechprompt prepare-dataset DATASET --help"


def run(args: argparse.Namespace) -> int:
    summary = prepare(args.dataset, args.root, args.out, **apply_overrides({}, args.options))
    for split, stats in summary["splits"].items():
        skipped = f", {stats['skipped']} files left out" if stats["skipped"] else ""
        print(f"{args.out}/{split}.tsv: {stats['utterances']} utterances{skipped}")
    if summary["skipped"]:
        print(f"the files left out and why: {args.out}/{SUMMARY_FILE} (\"skipped\")")
    print(json.dumps({s: v["utterances"] for s, v in summary["splits"].items()}))
    return 0
