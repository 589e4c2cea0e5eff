"""SUPERB data: audio manifests with line-aligned labels, read by a ``DataLoader`` (worker processes optional).

A file that fails to load (corrupt, empty, silent, missing) does not end a run: it is logged once, recorded in
``split.unreadable``, and left out of its batch; later epochs skip it without reading it again.

Two training-time options of s3prl's datasets: a random crop of long utterances (:class:`Crop`; SID trains on 8 s
windows) and class-balanced sampling with replacement (:func:`balanced_order`; s3prl's KS ``WeightedRandomSampler``).
Both are functions of the seed, the epoch and the row, so a resumed run reads exactly what an uninterrupted one
does.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from speechprompt.audio import load_audio
from speechprompt.data_prep.manifest import ManifestError, labels_path, read_labels, read_manifest
from speechprompt.errors import AudioError

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class AudioSplit:
    """Audio paths and their labels (or transcripts), line-aligned.

    ``unreadable`` fills up as files fail to load (row -> why): they are left out of batches, reported once, and
    every later pass skips them too.
    """

    paths: list[Path]
    labels: list[str]
    unreadable: dict[int, str] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)


def load_audio_split(manifest: str | os.PathLike, labels: str | os.PathLike | None = None) -> AudioSplit:
    """A manifest and its labels (default: the ``.labels`` sidecar beside it).

    Raises:
        ManifestError: an unreadable manifest or label file, or counts that differ.
    """
    m = read_manifest(manifest)
    labels_file = labels if labels is not None else labels_path(manifest)
    label_lines = read_labels(labels_file)
    if len(label_lines) != len(m):
        raise ManifestError(f"{labels_file} has {len(label_lines)} lines but {manifest} has {len(m)} rows")
    if not len(m):
        raise ManifestError(f"{manifest} has no rows")
    return AudioSplit(m.paths(), label_lines)


@dataclasses.dataclass
class AudioBatch:
    """The readable utterances of one batch: their rows in the split, waveforms and labels; and the rows that
    could not be read, with why."""

    rows: list[int]
    wavs: list[np.ndarray]
    labels: list[str]
    failed: dict[int, str]


@dataclasses.dataclass(frozen=True)
class Crop:
    """Cut utterances longer than ``samples`` to a window of that length, whose start is drawn from ``(seed, epoch,
    row)``."""

    samples: int
    seed: int
    epoch: int

    def __call__(self, wav: np.ndarray, row: int) -> np.ndarray:
        if len(wav) <= self.samples:
            return wav
        start = int(np.random.default_rng([self.seed, self.epoch, row]).integers(0, len(wav) - self.samples + 1))
        return wav[start:start + self.samples]


class _Reader(torch.utils.data.Dataset):
    """Row -> (row, waveform or None, label, error); runs in the loader's worker processes."""

    def __init__(self, split: AudioSplit, crop: Crop | None = None) -> None:
        self.split, self.crop = split, crop

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, row: int) -> tuple[int, np.ndarray | None, str, str | None]:
        try:
            wav = load_audio(self.split.paths[row])
        except AudioError as e:
            return row, None, self.split.labels[row], str(e)
        return row, self.crop(wav, row) if self.crop is not None else wav, self.split.labels[row], None


def _collate(items: Sequence[tuple[int, np.ndarray | None, str, str | None]]) -> AudioBatch:
    batch = AudioBatch([], [], [], {})
    for row, wav, label, error in items:
        if wav is None:
            batch.failed[row] = error or "unreadable"
        else:
            batch.rows.append(row)
            batch.wavs.append(wav)
            batch.labels.append(label)
    return batch


def read_batches(split: AudioSplit, groups: Sequence[Sequence[int]], num_workers: int = 0,
                 crop: Crop | None = None) -> Iterator[AudioBatch]:
    """The audio of each group of rows, in order, read by ``num_workers`` processes ahead of the consumer (and cut
    by ``crop``, if given).

    Rows already known to be unreadable are not read again; newly failing ones are logged and recorded in
    ``split.unreadable`` as their batch arrives. A group may come out empty.
    """
    skip = set(split.unreadable)
    loader = torch.utils.data.DataLoader(
        _Reader(split, crop), batch_sampler=[[r for r in g if r not in skip] for g in groups], collate_fn=_collate,
        num_workers=num_workers,
        # Its own generator: an iterator would otherwise draw a seed from the global RNG, at a different step in a
        # resumed run than in an uninterrupted one (the draw would shift every dropout mask after it).
        generator=torch.Generator(),
    )
    for batch in loader:
        for row, why in batch.failed.items():
            split.unreadable[row] = why
            logger.warning("skipping row %d: %s", row, why)
        yield batch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled row order of one training epoch (a function of seed and epoch: a resumed run redraws it)."""
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


def balanced_order(labels: Sequence[str], seed: int, epoch: int) -> list[int]:
    """``len(labels)`` rows drawn with replacement, each with probability ``1 / (classes * its class's count)``:
    every class equally likely per draw (s3prl's KS sampler). A function of seed and epoch, like
    :func:`epoch_order`."""
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    weights = np.array([1.0 / counts[label] for label in labels])
    rng = np.random.default_rng([seed, epoch, 1])  # another stream than epoch_order's
    return rng.choice(len(labels), size=len(labels), replace=True, p=weights / weights.sum()).tolist()
