"""What every dataset preparer shares: the registry, layout checks, and writing one split.

A preparer turns a dataset as it is distributed into the toolkit's own format: for each split, a fairseq manifest
``OUT/<split>.tsv`` (root line, then ``relpath<TAB>num_samples``) and its label sidecar ``OUT/<split>.labels``, both
written by :mod:`speechprompt.data_prep.manifest`, plus ``OUT/summary.json`` (counts, label histograms, the files
that were left out and why, and the options used).

Register a preparer with :func:`register_dataset`; its options are a dataclass whose fields carry help text, so that
``speechprompt prepare-dataset --help`` lists them and a misspelt option is an error.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from speechprompt.audio import audio_info
from speechprompt.config import ConfigError, from_dict, to_dict
from speechprompt.data_prep.manifest import Manifest, ManifestEntry, write_labels, write_manifest_file
from speechprompt.errors import AudioError, SpeechPromptError
from speechprompt.fileio import write_json

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "dev", "test")
SUMMARY_FILE = "summary.json"


class DatasetError(SpeechPromptError):
    """A dataset root that does not have the layout its preparer expects."""


@dataclass(frozen=True)
class DatasetSpec:
    """One registered dataset.

    Attributes:
        name: the name on the command line (``speechprompt prepare-dataset NAME``).
        options: the dataclass of the preparer's options.
        build: ``build(root, out, options) -> Listing``: each split's audio and labels (``out`` is there for
            preparers that must write audio, such as the Speech Commands silence clips).
        layout: the expected folder layout, shown in ``--help`` and in every layout error.
        task: the ``data.task`` of the training config these labels go with.
    """

    name: str
    options: type
    build: Callable[[Path, Path, Any], Listing]
    layout: str
    task: str

    @property
    def summary_line(self) -> str:
        return (self.build.__doc__ or "").strip().splitlines()[0]


@dataclass(frozen=True)
class Item:
    """One utterance to list: its audio file and its label (one line of text)."""

    path: Path
    label: str


@dataclass
class Listing:
    """What a dataset's ``build`` returns: the items of each split, and notes recorded in ``summary.json``."""

    splits: dict[str, list[Item]]
    notes: dict[str, Any] = field(default_factory=dict)


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(name: str, options: type, layout: str, task: str) -> Callable:
    """Register a ``build(root, out, options) -> Listing`` function as dataset ``name``.

    Args:
        name: the dataset's name on the command line.
        options: the dataclass of its options (fields made with :func:`speechprompt.config.option`).
        layout: the folder layout the root must have, shown in ``--help`` and in layout errors.
        task: the ``data.task`` its labels are for (classification, multislot or sequence).
    """

    def wrap(build: Callable[[Path, Path, Any], Listing]) -> Callable:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is registered twice")
        if not dataclasses.is_dataclass(options):
            raise TypeError(f"options of {name!r} must be a dataclass")
        DATASETS[name] = DatasetSpec(name, options, build, layout.strip("\n"), task)
        return build

    return wrap


def get_dataset(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}") from None


# ---------------------------------------------------------------------------------------------------------------
# Layout checks


def _missing(path: Path, spec_name: str, what: str, noun: str) -> DatasetError:
    layout = DATASETS[spec_name].layout if spec_name in DATASETS else ""
    return DatasetError(f"{spec_name}: missing {noun} {path} ({what}). Expected layout:\n{layout}")


def require_dir(path: Path, spec_name: str, what: str) -> Path:
    """``path`` if it is a folder, else a :class:`DatasetError` naming it, saying what it holds and showing the
    dataset's layout."""
    if not path.is_dir():
        raise _missing(path, spec_name, what, "folder")
    return path


def require_file(path: Path, spec_name: str, what: str) -> Path:
    """``path`` if it is a file, else a :class:`DatasetError` as :func:`require_dir` raises."""
    if not path.is_file():
        raise _missing(path, spec_name, what, "file")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Writing splits


@dataclass
class SplitResult:
    """What :func:`write_split` wrote and what it left out."""

    manifest: Manifest
    labels: list[str]
    skipped: list[str]

    def summary(self, histogram: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "utterances": len(self.manifest),
            "skipped": len(self.skipped),
            "samples": int(sum(e.num_samples for e in self.manifest.entries)),
            "root": str(self.manifest.root),
        }
        if histogram:
            out["labels"] = dict(sorted(Counter(self.labels).items()))
        return out


def _absolute(path: Path) -> Path:
    """``path`` made absolute without following symlinks (datasets are often trees of links to elsewhere)."""
    return Path(os.path.abspath(path))


def _common_root(paths: Iterable[Path]) -> Path:
    """The deepest folder that holds every one of ``paths`` (absolute)."""
    return Path(os.path.commonpath(sorted({str(_absolute(p).parent) for p in paths})))


def write_split(out: Path, split: str, items: Sequence[Item], root: Path | None = None) -> SplitResult:
    """Write ``out/<split>.tsv`` and ``out/<split>.labels`` for ``items``, leaving out audio that cannot be used.

    A file is left out (and reported) when its header cannot be read, when it holds no samples, or when its label
    is empty or spans lines. The header is all that is read here; ``speechprompt prepare`` decodes every file and
    deals with the rest.

    Args:
        out: output directory.
        split: split name (the file stem).
        items: the utterances, in the order to list them.
        root: the manifest's root (default: the deepest folder holding every file).

    Returns:
        The manifest written, its labels (line-aligned) and ``"path: reason"`` for every file left out.
    """
    kept: list[tuple[Item, int]] = []
    skipped: list[str] = []
    for item in items:
        label = item.label.strip()
        if not label or "\n" in label or "\r" in label:
            skipped.append(f"{item.path}: empty or multi-line label {item.label!r}")
            continue
        try:
            info = audio_info(item.path)
        except AudioError as e:
            skipped.append(f"{item.path}: {e.problem}")
            continue
        if info.frames <= 0:
            skipped.append(f"{item.path}: empty audio (0 samples)")
            continue
        kept.append((Item(item.path, label), info.frames))
    for line in skipped:
        logger.warning("%s: left out: %s", split, line)
    if not kept:
        raise DatasetError(f"split {split!r}: none of its {len(items)} files could be used"
                           + (f" (first problem: {skipped[0]})" if skipped else ""))
    base = _absolute(root) if root is not None else _common_root(i.path for i, _ in kept)
    entries = [ManifestEntry(_absolute(i.path).relative_to(base).as_posix(), n) for i, n in kept]
    manifest = Manifest(base, entries)
    labels = [i.label for i, _ in kept]
    out.mkdir(parents=True, exist_ok=True)
    write_manifest_file(out / f"{split}.tsv", manifest)
    write_labels(out / f"{split}.labels", labels)
    return SplitResult(manifest, labels, skipped)


def prepare(name: str, root: str | Path, out: str | Path, **options: Any) -> dict[str, Any]:
    """Prepare dataset ``name`` from ``root`` into ``out``; returns what is written to ``out/summary.json``.

    Args:
        name: a registered dataset (``speech_commands``, ``fluent_commands``, ``librispeech``, ``snips``, ``voxceleb1``,
            ``iemocap``, ``librilight``, ``esc50``).
        root: the dataset as distributed (see each dataset's layout).
        out: output directory for ``{train,dev,test}.tsv`` / ``.labels`` and ``summary.json``.
        **options: fields of the dataset's options dataclass.

    Raises:
        DatasetError: the root lacks a file or folder of the layout, or a split ends up empty.
        ConfigError: an unknown option or a value of the wrong type.
    """
    spec = get_dataset(name)
    opts = options_from(spec, options)
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise DatasetError(f"{name}: dataset root {root} is not a folder. Expected layout:\n{spec.layout}")
    listing = spec.build(root, out, opts)
    histogram = spec.task != "sequence"  # a histogram of transcripts says nothing
    summary: dict[str, Any] = {"dataset": name, "root": str(_absolute(root)), "task": spec.task,
                               "options": to_dict(opts), **listing.notes, "splits": {}, "skipped": {}}
    for split, items in listing.splits.items():
        result = write_split(out, split, items)
        summary["splits"][split] = result.summary(histogram)
        if result.skipped:
            summary["skipped"][split] = result.skipped
    write_json(out / SUMMARY_FILE, summary)
    return summary


def options_from(spec: DatasetSpec, data: dict[str, Any]) -> Any:
    """The options dataclass of ``spec`` from a mapping (unknown keys and wrong types raise ConfigError)."""
    try:
        return from_dict(spec.options, data)
    except ConfigError as e:
        raise ConfigError(f"{spec.name}: {e}") from None
