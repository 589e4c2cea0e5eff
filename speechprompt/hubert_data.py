"""HuBERT pretraining data: audio with frame-level cluster labels, cut into the batches of every update.

**Inputs.** A fairseq manifest (``root``, then ``relpath<TAB>num_samples`` at 16 kHz) and, per label set, a label
file with one line per manifest row: the row's k-means unit of every frame, at ``label_rate`` frames per second
(``speechprompt prepare`` without ``--dedup`` writes such files: MFCC units at 100 Hz for the first iteration, a
HuBERT layer's units at 50 Hz for the second). An empty line (audio ``prepare`` could not read) drops its row, as
does a row shorter than ``min_sample_size``. A row whose labels do not span its audio (more than 0.1 s apart, what
fairseq warns about) is an error: ``label_rate`` is wrong, or the labels belong to another manifest.

**Batches** follow fairseq's HuBERT recipe (``pad_audio: false``, ``random_crop: true``): every utterance of a batch
is cropped, at a random offset, to the batch's shortest utterance (at most ``max_sample_size`` samples), so a batch
has no padding, and its labels are cut to the same span (``round(offset * label_rate / 16000)`` onwards). Batches
hold utterances of similar lengths: each epoch sorts the utterances by length (ties broken at random), cuts the order
into batches and shuffles the batches. The labels are then read at the model's frame rate as fairseq's
``forward_targets`` reads them (frame ``i`` takes label ``int(i * label_rate * samples_per_frame / 16000)``; the
frames are trimmed to the labels there are), and the span masks are drawn
(:func:`~speechprompt.models.hubert_pretraining.compute_mask_indices`).

**Determinism.** Update ``s`` takes global batch ``s`` of the endless sequence of epochs, and its crops and masks come
from generators seeded by ``(seed, s)`` and the row's place in the global batch, nothing else. So a resumed run
draws what an uninterrupted one drew, with any number of loader workers, and N processes (each taking its slice of
the global batch) draw the crops and masks of one process that takes it all; the masks are equalised over the
global batch (fairseq equalises each GPU's batch on its own), which is what makes N processes equal one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from speechprompt.audio import SAMPLE_RATE, AudioError, load_audio
from speechprompt.data_prep.manifest import Manifest, read_manifest
from speechprompt.errors import SpeechPromptError
from speechprompt.models.hubert_pretraining import compute_mask_indices

LABEL_OFFSET = 4  # unit u is class u + 4 of fairseq's dict.km.txt dictionary (after <s>, <pad>, </s>, <unk>)
MIN_MASKS = 2  # fairseq's HubertModel.apply_mask
DURATION_TOLERANCE_S = 0.1  # fairseq's verify_label_lengths
# Domains of the seeds: one stream of generators per purpose, so that no two draws share one.
_CROP, _MASK, _DEV_CROP, _DEV_MASK, _ORDER = range(5)


class HubertDataError(SpeechPromptError):
    """A manifest, label file or audio file that HuBERT pretraining cannot use."""


@dataclass
class Masking:
    """How spans are masked (HuBERT: 0.8 and 10 frames; fairseq's ``min_masks`` is 2)."""

    mask_prob: float = 0.8
    mask_length: int = 10


# --------------------------------------------------------------------------------------------------------------
# Audio + labels


def read_label_lines(path: str | os.PathLike, rows: int, n_units: int) -> list[np.ndarray | None]:
    """One line per manifest row: the row's units as an int array, or ``None`` for an empty line.

    Raises:
        HubertDataError: unreadable file, another number of lines than ``rows``, or a token that is not a unit in
            ``[0, n_units)`` (naming the file and line).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise HubertDataError(f"{path}: cannot read label file ({e.strerror})") from None
    if len(lines) != rows:
        raise HubertDataError(f"{path} has {len(lines)} lines but its manifest {rows} rows: labels need one line per "
                              "row, in order (`speechprompt prepare` without --dedup writes them)")
    out: list[np.ndarray | None] = []
    for n, line in enumerate(lines, 1):
        tokens = line.split()
        if not tokens:
            out.append(None)
            continue
        try:
            units = np.array(tokens, dtype=np.int64)
        except ValueError:
            raise HubertDataError(f"{path}:{n}: not a line of unit ids") from None
        if units.min() < 0 or units.max() >= n_units:
            bad = int(units[(units < 0) | (units >= n_units)][0])
            raise HubertDataError(f"{path}:{n}: unit {bad} is outside [0, {n_units}) (is n_units right?)")
        out.append(units)
    return out


class LabeledAudio:
    """A manifest's usable rows with their frame labels (see the module docstring).

    Args:
        manifest: the manifest file.
        label_files: one label file per label set.
        n_units: the clusters of each label set.
        label_rate: label frames per second (100 for MFCC, 50 for HuBERT features).
        min_sample_size: rows shorter than this (samples) are dropped.
        normalize: layer-normalise each waveform (the task's ``normalize``, for ``layer_norm`` front ends).
    """

    def __init__(self, manifest: str | os.PathLike, label_files: Sequence[str | os.PathLike], n_units: Sequence[int],
                 label_rate: float, min_sample_size: int = 0, normalize: bool = False) -> None:
        if len(label_files) != len(n_units):
            raise HubertDataError(f"{len(label_files)} label files but {len(n_units)} label-set sizes (n_units)")
        self.manifest: Manifest = read_manifest(manifest)
        self.label_rate, self.normalize = float(label_rate), normalize
        rows = len(self.manifest)
        per_set = [read_label_lines(f, rows, k) for f, k in zip(label_files, n_units)]
        self.rows: list[int] = []
        self.dropped = {"no_labels": 0, "too_short": 0}
        for i, entry in enumerate(self.manifest.entries):
            if any(labels[i] is None for labels in per_set):
                self.dropped["no_labels"] += 1
                continue
            if entry.num_samples < min_sample_size:
                self.dropped["too_short"] += 1
                continue
            for f, labels in zip(label_files, per_set):
                label_s, audio_s = len(labels[i]) / self.label_rate, entry.num_samples / SAMPLE_RATE
                if abs(label_s - audio_s) > DURATION_TOLERANCE_S:
                    raise HubertDataError(
                        f"{f}:{i + 1}: {len(labels[i])} labels at label_rate {self.label_rate:g} last {label_s:.2f} s "
                        f"but the audio {audio_s:.2f} s: is label_rate right (100 for MFCC units, 50 for HuBERT "
                        "units), and do the labels belong to this manifest?")
            self.rows.append(i)
        if not self.rows:
            raise HubertDataError(f"{manifest}: no usable row (of {rows}: {self.dropped['no_labels']} without labels, "
                                  f"{self.dropped['too_short']} shorter than min_sample_size={min_sample_size})")
        self.sizes = np.array([self.manifest.entries[i].num_samples for i in self.rows], dtype=np.int64)
        self.labels = [[labels[i] for i in self.rows] for labels in per_set]  # per set, per kept row

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def seconds(self) -> float:
        return float(self.sizes.sum()) / SAMPLE_RATE

    def audio(self, index: int) -> Tensor:
        """Row ``index``'s waveform ``(T,)``, normalised if asked (before any crop, as fairseq's dataset)."""
        path = self.manifest.path(self.rows[index])
        try:
            wav = torch.from_numpy(load_audio(path, min_samples=0))
        except AudioError as e:
            raise HubertDataError(f"{e} (drop it from the manifest, or leave its label line empty)") from None
        if len(wav) != self.sizes[index]:
            raise HubertDataError(f"{path}: {len(wav)} samples at 16 kHz but the manifest says {self.sizes[index]}; "
                                  "rewrite the manifest")
        return F.layer_norm(wav, wav.shape) if self.normalize else wav


# --------------------------------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    """One process's rows of a global batch: no padding, every row ``T`` samples and ``F`` frames.

    Attributes:
        source: ``(b, T)`` waveforms.
        targets: per label set ``(b, F)`` class indices (unit + 4).
        mask: ``(b, F)`` bool, the frames to mask.
    """

    source: Tensor
    targets: list[Tensor]
    mask: Tensor

    def __len__(self) -> int:
        return self.source.shape[0]

    def split(self, parts: int) -> list[Batch]:
        """Up to ``parts`` micro-batches of consecutive rows (fewer if there are fewer rows)."""
        if len(self) == 0:
            return []
        idx = torch.arange(len(self)).chunk(parts)
        return [Batch(self.source[i], [t[i] for t in self.targets], self.mask[i]) for i in idx]


class BatchMaker:
    """Builds the :class:`Batch` of a global batch of rows: crops, labels at the model's frame rate, masks.

    Args:
        data: the audio and labels.
        frames_of: the model's frames for a number of samples (``HubertModel.num_frames``).
        samples_per_frame: the model's samples per frame (320 at 50 Hz).
        masking: span masking.
        max_sample_size: longest crop (samples).
    """

    def __init__(self, data: LabeledAudio, frames_of: Callable[[int], int], samples_per_frame: int,
                 masking: Masking, max_sample_size: int) -> None:
        self.data, self.frames_of, self.masking = data, frames_of, masking
        self.max_sample_size = max_sample_size
        # fairseq's feat2tar_ratio: label frames per model frame.
        self.ratio = data.label_rate * samples_per_frame / SAMPLE_RATE

    def make(self, rows: Sequence[int], mine: slice, seed: Sequence[int], mask_seed: Sequence[int]) -> Batch:
        """The batch of the global ``rows`` (indices into ``data``), of which this process keeps ``rows[mine]``.

        Crop offsets come from ``np.random.default_rng(seed)``, row ``i``'s masks from ``default_rng([*mask_seed,
        i])``: what every process draws for the whole global batch, whatever its share.
        """
        sizes = self.data.sizes[list(rows)]
        size = int(min(sizes.min(), self.max_sample_size))
        rng = np.random.default_rng(list(seed))
        starts = [int(rng.integers(0, s - size + 1)) if s > size else 0 for s in sizes]  # fairseq's random_crop
        s2f = self.data.label_rate / SAMPLE_RATE
        frm_starts = [int(round(s * s2f)) for s in starts]
        frm_size = int(round(size * s2f))
        for labels in self.data.labels:  # no crop may run past a row's last label
            frm_size = min(frm_size, *(len(labels[r]) - f for r, f in zip(rows, frm_starts)))
        frames, label_idx = frame_labels(self.frames_of(size), frm_size, self.ratio)
        rngs = [np.random.default_rng([*mask_seed, i]) for i in range(len(rows))]
        mask = compute_mask_indices((len(rows), frames), None, self.masking.mask_prob, self.masking.mask_length,
                                    MIN_MASKS, rngs)

        my_rows = list(rows)[mine]
        my_starts = starts[mine]
        my_frm = frm_starts[mine]
        source = torch.stack([self.data.audio(r)[s : s + size] for r, s in zip(my_rows, my_starts)]) \
            if my_rows else torch.zeros(0, size)
        targets = []
        for labels in self.data.labels:
            cut = [torch.from_numpy(labels[r][f : f + frm_size]) for r, f in zip(my_rows, my_frm)]
            stacked = torch.stack(cut) if cut else torch.zeros(0, frm_size, dtype=torch.long)
            targets.append(stacked[:, label_idx] + LABEL_OFFSET)  # (b, F)
        return Batch(source, targets, torch.from_numpy(mask[mine]))


def frame_labels(frames: int, label_frames: int, ratio: float) -> tuple[int, Tensor]:
    """fairseq's ``forward_targets``: the model frames that have a label, and the label index of each.

    Args:
        frames: the front end's frames for the crop.
        label_frames: the labels of the crop.
        ratio: label frames per model frame (``label_rate * samples_per_frame / 16000``: 2 for MFCC labels at
            100 Hz under a 50 Hz model, 1 for HuBERT labels).

    Returns:
        ``F`` (``frames``, trimmed to ``int(label_frames / ratio)`` when the labels end first) and the ``(F,)``
        label index of every frame, ``int(i * ratio)`` computed in float32 as fairseq does.
    """
    if ratio * frames > label_frames:
        frames = int(label_frames / ratio)
    return frames, (torch.arange(frames).float() * ratio).long()


def length_sorted_batches(sizes: np.ndarray, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    """Row indices sorted by length and cut into batches of ``batch_size`` (the last may be smaller). With ``rng``,
    ties are broken at random and the batches are shuffled (training); without, the order is fixed (dev)."""
    n = len(sizes)
    tiebreak = rng.permutation(n) if rng is not None else np.arange(n)
    order = np.lexsort((tiebreak, sizes))
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


class StepBatches(torch.utils.data.Dataset):  # endless, so no __len__: a sampler chooses the steps
    """Training batches indexed by update: item ``s`` is this process's :class:`Batch` of update ``s``.

    Args:
        maker: builds batches.
        batch_size: rows of a global batch (every process and micro-batch of one update).
        seed: seeds the epochs' orders, the crops and the masks.
        rank: this process's rank.
        world_size: processes sharing each update.
    """

    def __init__(self, maker: BatchMaker, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        self.maker, self.batch_size, self.seed = maker, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self._epoch: tuple[int, list[np.ndarray]] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.maker.data) // self.batch_size)

    def epoch_of(self, step: int) -> float:
        """Epochs consumed before update ``step`` (fractional)."""
        return step / self.batches_per_epoch

    def rows(self, step: int) -> np.ndarray:
        """The global batch (row indices) of update ``step``."""
        epoch, j = divmod(step, self.batches_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, _ORDER, epoch])
            self._epoch = (epoch, length_sorted_batches(self.maker.data.sizes, self.batch_size, rng))
        return self._epoch[1][j]

    def __getitem__(self, step: int) -> Batch:
        rows = self.rows(step)
        return self.maker.make(rows, share(len(rows), self.rank, self.world_size), [self.seed, _CROP, step],
                               [self.seed, _MASK, step])


def share(n: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous slice of ``n`` rows (a short last batch of an epoch may leave a process none;
    it still joins the update's all-reduce)."""
    return slice(n * rank // world_size, n * (rank + 1) // world_size)


def dev_batches(maker: BatchMaker, batch_size: int, seed: int) -> list[tuple[np.ndarray, list[int], list[int]]]:
    """The dev set as fixed batches: ``(rows, crop seed, mask seed)`` for each, the same at every evaluation."""
    return [(rows, [seed, _DEV_CROP, j], [seed, _DEV_MASK, j])
            for j, rows in enumerate(length_sorted_batches(maker.data.sizes, batch_size, None))]
