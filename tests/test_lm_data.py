"""Packed LM data: reading unit files, the token stream, blocks and targets (against fairseq's TokenBlockDataset,
run as an oracle in its own environment, see tests/oracle.py), and the step-indexed batch order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from oracle import run_oracle

from speechprompt.dictionary import Dictionary
from speechprompt.lm_data import (
    PackedLMDataset,
    StepBatches,
    UnitFileError,
    build_stream,
    epoch_permutation,
    read_unit_file,
)

EOS, PAD = Dictionary.eos_index, Dictionary.pad_index


def _utterances(n: int = 23, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 10, size=int(rng.integers(1, 9))) for _ in range(n)]


def test_read_unit_file_skips_empty_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.units"
    path.write_text("3 1 4\n\n   \n1 5\n")
    out = read_unit_file(path, n_units=10)
    assert [u.tolist() for u in out] == [[3, 1, 4], [1, 5]]


@pytest.mark.parametrize(
    ("text", "message"),
    [("1 2\n3 x 4\n", r"a\.units:2: 'x' is not a unit id"), ("1 2\n\n7 10\n", r"a\.units:3: unit 10 is outside")],
)
def test_read_unit_file_names_the_bad_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "a.units"
    path.write_text(text)
    with pytest.raises(UnitFileError, match=message):
        read_unit_file(path, n_units=10)


def test_stream_is_leading_eos_then_units_plus_eos_per_utterance() -> None:
    stream = build_stream([np.array([0, 5]), np.array([9])], Dictionary.for_units(10))
    assert stream.tolist() == [EOS, 4, 9, EOS, 13, EOS]


@pytest.mark.parametrize("tokens_per_sample", [1, 4, 7, 50, 1000])
def test_blocks_cover_every_target_once_with_the_previous_token_as_input(tokens_per_sample: int) -> None:
    stream = build_stream(_utterances(), Dictionary.for_units(10))
    ds = PackedLMDataset(stream, tokens_per_sample)
    assert len(ds) == -(-(len(stream) - 1) // tokens_per_sample)
    sources, targets = zip(*(ds[i] for i in range(len(ds))))
    assert torch.equal(torch.cat(targets), stream[1:])
    assert torch.equal(torch.cat(sources), stream[:-1])
    assert all(len(t) == tokens_per_sample for t in targets[:-1])
    assert 1 <= len(targets[-1]) <= tokens_per_sample
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_collate_right_pads_short_blocks_with_pad() -> None:
    ds = PackedLMDataset(torch.tensor([EOS, 4, 5, 6, EOS, 7, EOS]), tokens_per_sample=4)
    source, target = ds.collate([ds[1], ds[0]])
    assert source.tolist() == [[EOS, 7, PAD, PAD], [EOS, 4, 5, 6]]
    assert target.tolist() == [[7, EOS, PAD, PAD], [4, 5, 6, EOS]]


def test_from_unit_files_concatenates_files_in_order(tmp_path: Path) -> None:
    (tmp_path / "a.units").write_text("1 2\n")
    (tmp_path / "b.units").write_text("\n3\n")
    ds = PackedLMDataset.from_unit_files([tmp_path / "a.units", tmp_path / "b.units"], Dictionary.for_units(4), 100)
    assert ds.num_utterances == 2
    assert ds[0][1].tolist() == [5, 6, EOS, 7, EOS]
    assert ds.token_counts(8).tolist() == [0, 0, 2, 0, 0, 1, 1, 1]


@pytest.fixture(scope="module")
def fairseq_blocks(tmp_path_factory) -> tuple[list[np.ndarray], dict]:
    """40 utterances, and the blocks fairseq's TokenBlockDataset cuts them into (tests/oracles/fairseq/lm_data.py)
    for 5 and 16 tokens per sample."""
    utterances = _utterances(40, seed=3)
    sentences = [(u + 4).tolist() + [EOS] for u in utterances]  # units + 4 specials, then </s>
    out = run_oracle("fairseq", "lm_data", tmp_path_factory.mktemp("fairseq_blocks"), sentences=sentences,
                     tokens_per_sample=[5, 16], pad=PAD, eos=EOS)
    return utterances, torch.load(out / "blocks.pt", weights_only=True)


@pytest.mark.fairseq
@pytest.mark.parametrize("tokens_per_sample", [5, 16])
def test_blocks_equal_fairseq_token_block_dataset(fairseq_blocks, tokens_per_sample: int) -> None:
    utterances, blocks = fairseq_blocks
    theirs = blocks[str(tokens_per_sample)]
    ours = PackedLMDataset(build_stream(utterances, Dictionary.for_units(10)), tokens_per_sample)
    assert len(ours) == len(theirs["source"]) == len(theirs["target"])
    for i in range(len(ours)):
        assert torch.equal(ours[i][0], theirs["source"][i])
        assert torch.equal(ours[i][1], theirs["target"][i])


def test_each_epoch_visits_every_block_once_in_a_seeded_order() -> None:
    ds = PackedLMDataset(torch.arange(2, 2 + 41), tokens_per_sample=1)  # 40 blocks, block i has target i + 3
    batches = StepBatches(ds, batch_size=4, seed=7)
    epoch0 = [i for s in range(10) for i in batches.block_indices(s)]
    epoch1 = [i for s in range(10, 20) for i in batches.block_indices(s)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(40))
    assert epoch0 == epoch_permutation(40, 7, 0).tolist() != epoch1
    assert epoch0 != [i for s in range(10) for i in StepBatches(ds, 4, seed=8).block_indices(s)]
    source, target = batches[3]
    assert target[:, 0].tolist() == [i + 3 for i in batches.block_indices(3)]
    assert source.shape == (4, 1)


def test_steps_crossing_epochs_and_ranks_partition_the_single_process_batch() -> None:
    ds = PackedLMDataset(torch.arange(2, 2 + 11), tokens_per_sample=1)  # 10 blocks: steps straddle epochs
    single = StepBatches(ds, batch_size=6, seed=1)
    ranks = [StepBatches(ds, batch_size=3, seed=1, rank=r, world_size=2) for r in range(2)]
    for step in range(7):
        assert single.block_indices(step) == ranks[0].block_indices(step) + ranks[1].block_indices(step)
    assert single.epoch_of(5) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="rank 2"):
        StepBatches(ds, 3, seed=1, rank=2, world_size=2)


def test_batches_depend_only_on_the_step_through_a_dataloader_with_workers() -> None:
    ds = PackedLMDataset(torch.arange(2, 2 + 301) % 20 + 2, tokens_per_sample=8)
    batches = StepBatches(ds, batch_size=3, seed=5)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(4, 9), num_workers=2)
    for step, (source, target) in zip(range(4, 9), loader):
        expected = batches[step]
        assert torch.equal(source, expected[0]) and torch.equal(target, expected[1])
