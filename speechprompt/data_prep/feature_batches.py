"""Reading many utterances: length-sorted batches of bounded padded size (:func:`length_batches`), waveforms read
batch by batch with each failure kept in its place (:func:`read_waveforms`), and audio files loaded a window at a
time and yielded in input order (:func:`read_files`), as ``prepare`` and ``kmeans`` read them."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from speechprompt.audio import SAMPLE_RATE, load_audio
from speechprompt.data_prep.feature_reader import FeatureReader

DEFAULT_BATCH_SECONDS = 100.0
# Audio is loaded this many batches ahead, so that sorting by length has utterances to choose from.
_WINDOW_BATCHES = 8


@dataclass
class FileFeatures:
    """One result of :func:`read_files`: the features of ``paths[index]``, or why there are none."""

    index: int
    samples: int  # waveform length after loading (0 when unreadable)
    feats: torch.Tensor | None  # (frames, D) float32
    error: Exception | None


def length_batches(lengths: Sequence[int], max_samples: int) -> list[list[int]]:
    """Indices of ``lengths`` sorted longest first and grouped so that each batch's padded size, count times its
    longest, is at most ``max_samples`` (a longer utterance is a batch of its own). ``max_samples <= 0``: one
    utterance per batch, in input order."""
    if max_samples <= 0:
        return [[i] for i in range(len(lengths))]
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        # Longest first, so the batch's first member sets its padded length.
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_samples:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def read_waveforms(
    reader: FeatureReader, wavs: Sequence[np.ndarray | torch.Tensor], batch_seconds: float = DEFAULT_BATCH_SECONDS
) -> list[torch.Tensor | Exception]:
    """Features of each waveform, in input order, read in length-sorted batches of at most ``batch_seconds`` of
    padded audio (0: one at a time). A batch that fails is read again one utterance at a time, so that one bad
    input gets its own error (in its place in the result) and the others their features."""
    out: list[torch.Tensor | Exception | None] = [None] * len(wavs)
    lengths = [len(w) for w in wavs]
    for batch in length_batches(lengths, int(batch_seconds * SAMPLE_RATE)):
        try:
            feats = reader.read_batch([wavs[i] for i in batch]) if len(batch) > 1 else [reader.read(wavs[batch[0]])]
        except Exception:  # find which one: read each alone
            feats = []
            for i in batch:
                try:
                    feats.append(reader.read(wavs[i]))
                except Exception as e:
                    feats.append(e)
        for i, f in zip(batch, feats):
            out[i] = f
    return out  # type: ignore[return-value]


def read_files(
    reader: FeatureReader,
    paths: Sequence[str | os.PathLike],
    batch_seconds: float = DEFAULT_BATCH_SECONDS,
    sizes: Sequence[int] | None = None,
) -> Iterator[FileFeatures]:
    """Load audio files and read their features, yielding one :class:`FileFeatures` per path in input order.

    Files are loaded a window at a time (about eight batches of audio, by ``sizes``, e.g. a manifest's sample
    counts), sorted by length within the window and read in batches of at most ``batch_seconds`` of padded audio
    (:func:`read_waveforms`; 0 reads one at a time). A file that cannot be loaded or read yields its exception
    and the rest are read as usual.
    """
    n = len(paths)
    max_samples = int(batch_seconds * SAMPLE_RATE)
    window = _WINDOW_BATCHES * max_samples
    start = 0
    while start < n:
        end, total = start + 1, (sizes[start] if sizes is not None else 0)
        while end < n and max_samples > 0 and (total + (sizes[end] if sizes is not None else max_samples) <= window):
            total += sizes[end] if sizes is not None else max_samples
            end += 1
        results: dict[int, FileFeatures] = {}
        wavs: dict[int, np.ndarray] = {}
        for i in range(start, end):
            try:
                wavs[i] = load_audio(paths[i])
            except Exception as e:
                results[i] = FileFeatures(i, 0, None, e)
        order = list(wavs)
        for i, f in zip(order, read_waveforms(reader, [wavs[i] for i in order], batch_seconds)):
            failed = isinstance(f, Exception)
            results[i] = FileFeatures(i, len(wavs[i]), None if failed else f, f if failed else None)
        del wavs
        for i in range(start, end):
            yield results[i]
        start = end
