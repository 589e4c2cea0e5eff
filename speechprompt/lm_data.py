"""Language-model data from unit files: one token stream, packed into fixed-size blocks.

This is fairseq's ``language_modeling`` task with ``sample_break_mode=none``: every utterance becomes
``units + </s>`` (``</s>`` separates sentences, as ``eval_lm`` expects), the utterances are concatenated into one
stream, and the stream is cut into blocks of ``tokens_per_sample`` targets regardless of utterance boundaries.

Inputs are the targets shifted right by one, and the first input of a block is the stream token just before it,
as in fairseq's ``TokenBlockDataset(include_targets=True)``: the stream is preceded by one ``</s>``, so the first
utterance is conditioned exactly like every other one. Each token of the stream is therefore predicted exactly
once per epoch. The last block may be shorter; :func:`collate` pads it with ``<pad>``, which the loss ignores.

Batches are a pure function of the step number (:class:`StepBatches`): step ``s`` takes the next
``batch_size * world_size`` blocks of an endless sequence of per-epoch permutations seeded by ``(seed, epoch)``,
and rank ``r`` keeps its slice. A resumed run, or a run on a different number of workers, sees the same blocks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from speechprompt.dictionary import Dictionary
from speechprompt.errors import SpeechPromptError


class UnitFileError(SpeechPromptError, ValueError):
    """A unit file that cannot be read as space-separated unit ids."""


def read_unit_file(path: str | os.PathLike, n_units: int) -> list[np.ndarray]:
    """Read one utterance per line (space-separated ints in ``[0, n_units)``). Empty lines are skipped.

    Raises:
        UnitFileError: naming the file and line of the first bad token.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UnitFileError(f"{path}: cannot read unit file ({e.strerror})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        try:
            units = np.array([int(t) for t in tokens], dtype=np.int64)
        except ValueError:
            bad = next(t for t in tokens if not t.lstrip("-").isdigit())
            raise UnitFileError(f"{path}:{n}: {bad!r} is not a unit id") from None
        if units.min() < 0 or units.max() >= n_units:
            bad = int(units[(units < 0) | (units >= n_units)][0])
            raise UnitFileError(f"{path}:{n}: unit {bad} is outside [0, {n_units}) (is n_units right?)")
        out.append(units)
    return out


def build_stream(utterances: Sequence[np.ndarray], dictionary: Dictionary) -> Tensor:
    """``</s> u1 </s> u2 </s> ...`` as token ids ``(N + 1,)``: units map to ``dictionary`` ids, each utterance
    ends with ``</s>``, and one leading ``</s>`` is the context of the first utterance."""
    offset = dictionary.nspecial
    if dictionary.symbols[offset:] != [str(u) for u in range(len(dictionary) - offset)]:
        raise ValueError("build_stream needs a unit dictionary whose symbols are '0', '1', ... in order")
    eos = np.array([dictionary.eos_index], dtype=np.int64)
    parts = [eos]
    for units in utterances:
        parts.append(units + offset)
        parts.append(eos)
    return torch.from_numpy(np.concatenate(parts))


class PackedLMDataset(torch.utils.data.Dataset):
    """Blocks of ``tokens_per_sample`` next-token targets cut from one token stream.

    Item ``i`` is ``(source, target)``, two ``(T_i,)`` long tensors with ``T_i <= tokens_per_sample`` (only the
    last block is shorter): ``target = stream[1 + i*T : 1 + (i+1)*T]`` and ``source`` is the same window shifted
    one token to the left, ``source[j]`` being the token just before ``target[j]``.

    Args:
        stream: ``(N + 1,)`` token ids beginning with the context token (see :func:`build_stream`).
        tokens_per_sample: targets per block (T).
        pad: the padding id used by :meth:`collate`.
        num_utterances: how many utterances the stream holds (informational).
    """

    def __init__(
        self, stream: Tensor, tokens_per_sample: int, pad: int = Dictionary.pad_index, num_utterances: int = 0
    ) -> None:
        if tokens_per_sample < 1:
            raise ValueError(f"tokens_per_sample must be positive, got {tokens_per_sample}")
        if stream.dim() != 1 or len(stream) < 2:
            raise ValueError("the token stream must be 1-D and hold at least one target")
        self.stream = stream.long()
        self.tokens_per_sample = tokens_per_sample
        self.pad = pad
        self.num_utterances = num_utterances
        self.num_targets = len(stream) - 1
        self.num_blocks = -(-self.num_targets // tokens_per_sample)

    @classmethod
    def from_unit_files(
        cls, paths: Sequence[str | os.PathLike], dictionary: Dictionary, tokens_per_sample: int
    ) -> PackedLMDataset:
        """Read and concatenate unit files (in order) into one packed dataset."""
        n_units = len(dictionary) - dictionary.nspecial
        utterances = [u for p in paths for u in read_unit_file(p, n_units)]
        if not utterances:
            raise UnitFileError(f"no utterances in {', '.join(map(str, paths))}")
        stream = build_stream(utterances, dictionary)
        return cls(stream, tokens_per_sample, pad=dictionary.pad_index, num_utterances=len(utterances))

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < self.num_blocks:
            raise IndexError(index)
        start = index * self.tokens_per_sample
        end = min(start + self.tokens_per_sample, self.num_targets)
        return self.stream[start:end], self.stream[start + 1 : end + 1]

    def collate(self, items: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """Stack items into ``(B, T)`` sources and targets, right-padded with ``pad``."""
        length = max(len(src) for src, _ in items)
        source = torch.full((len(items), length), self.pad, dtype=torch.long)
        target = torch.full((len(items), length), self.pad, dtype=torch.long)
        for row, (src, tgt) in enumerate(items):
            source[row, : len(src)] = src
            target[row, : len(tgt)] = tgt
        return source, target

    def token_counts(self, vocab_size: int) -> Tensor:
        """How often each token id occurs as a target ``(V,)``: the unigram statistics of the data."""
        return torch.bincount(self.stream[1:], minlength=vocab_size)


def epoch_permutation(num_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """The block order of ``epoch``, seeded by ``(seed, epoch)`` so that different seeds never share orders."""
    return np.random.default_rng([seed, epoch]).permutation(num_blocks)


class StepBatches(torch.utils.data.Dataset):  # endless, so no __len__: a sampler chooses the steps
    """Training batches indexed by step: item ``s`` is this rank's ``(source, target)`` batch for update ``s``.

    Update ``s`` consumes positions ``[s*G, (s+1)*G)`` of the endless block sequence
    ``perm(epoch 0) + perm(epoch 1) + ...`` with ``G = batch_size * world_size``; rank ``r`` keeps positions
    ``[s*G + r*batch_size, s*G + (r+1)*batch_size)``. Because an item depends on nothing but ``s``, a
    ``DataLoader`` over ``range(start_step, max_steps)`` resumes exactly and may use any number of workers.

    Args:
        dataset: the packed blocks.
        batch_size: blocks per rank and step.
        seed: seeds the per-epoch permutations.
        rank: this process's rank.
        world_size: the number of processes sharing a step.
    """

    def __init__(
        self, dataset: PackedLMDataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._perm_cache: tuple[int, np.ndarray] | None = None

    def blocks_per_step(self) -> int:
        return self.batch_size * self.world_size

    def epoch_of(self, step: int) -> float:
        """How many epochs have been consumed before update ``step`` (fractional)."""
        return step * self.blocks_per_step() / len(self.dataset)

    def _perm(self, epoch: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            self._perm_cache = (epoch, epoch_permutation(len(self.dataset), self.seed, epoch))
        return self._perm_cache[1]

    def block_indices(self, step: int) -> list[int]:
        """The block indices this rank trains on at update ``step``."""
        n = len(self.dataset)
        first = step * self.blocks_per_step() + self.rank * self.batch_size
        out = []
        for pos in range(first, first + self.batch_size):
            epoch, offset = divmod(pos, n)
            out.append(int(self._perm(epoch)[offset]))
        return out

    def __getitem__(self, step: int) -> tuple[Tensor, Tensor]:
        return self.dataset.collate([self.dataset[i] for i in self.block_indices(step)])
