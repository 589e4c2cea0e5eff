"""Character CTC: vocabulary round trips, the loss against a brute-force sum over alignments, greedy decoding."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from speechprompt.tasks.ctc import CharVocabulary, CTCError, ctc_loss, greedy_decode, normalize_text


def test_vocabulary_round_trip_and_word_boundary():
    vocab = CharVocabulary.from_texts(["go  left", " stop "])
    assert vocab.symbols == sorted(set("goleftstop")) + ["|"]
    assert len(vocab) == len(vocab.symbols) + 1  # the blank
    ids = vocab.encode(" stop   go ")
    assert 0 not in ids and vocab.decode(ids) == "stop go"
    assert CharVocabulary.from_dict(vocab.to_dict()).symbols == vocab.symbols


def test_unknown_characters_are_named():
    vocab = CharVocabulary.from_texts(["ab"])
    with pytest.raises(CTCError, match=r"\['z'\]"):
        vocab.encode("abz")
    with pytest.raises(CTCError):  # no word boundary was seen in training
        vocab.encode("a b")
    with pytest.raises(CTCError, match="empty"):
        CharVocabulary.from_texts(["", "   "])
    with pytest.raises(CTCError):
        CharVocabulary(["a", "a"])


def test_normalize_text():
    assert normalize_text("  a \t b\n") == "a b"


def test_greedy_decode_merges_repeats_drops_blanks_and_respects_lengths():
    # Paths (B=2, frames=7): a a _ a b b _  ->  a a b ;  second row only its first 3 frames count: b _ b -> b b
    paths = torch.tensor([[1, 1, 0, 1, 2, 2, 0], [2, 0, 2, 1, 1, 1, 1]])
    scores = torch.nn.functional.one_hot(paths, 3).float()  # (B, F, V)
    assert greedy_decode(scores, torch.tensor([7, 3])) == [[1, 1, 2], [2, 2]]


def _brute_force_ctc(log_probs: torch.Tensor, target: list[int]) -> float:
    """-log of the summed probability of every frame path that collapses to ``target``."""
    frames, vocab = log_probs.shape
    total = 0.0
    for path in itertools.product(range(vocab), repeat=frames):
        collapsed = [c for j, c in enumerate(path) if c != 0 and (j == 0 or c != path[j - 1])]
        if collapsed == target:
            total += math.exp(sum(log_probs[t, c].item() for t, c in enumerate(path)))
    return -math.log(total)


def test_ctc_loss_matches_the_sum_over_alignments():
    torch.manual_seed(0)
    log_probs = torch.randn(2, 5, 3).log_softmax(-1)  # (B, F, V)
    targets = [[1, 1], [2]]
    lengths = torch.tensor([5, 4])  # the second utterance is padded by one frame
    expected = _brute_force_ctc(log_probs[0, :5], [1, 1]) / 2 + _brute_force_ctc(log_probs[1, :4], [2]) / 1
    total, terms = ctc_loss(log_probs, lengths, targets)
    assert terms == 2  # the sum of per-utterance losses over target length, and how many utterances
    assert total.item() == pytest.approx(expected, rel=1e-5)


def test_ctc_loss_with_no_alignment_is_zero_not_inf():
    log_probs = torch.randn(1, 2, 3).log_softmax(-1)
    assert ctc_loss(log_probs, torch.tensor([2]), [[1, 1, 1]])[0].item() == 0.0  # 3 symbols cannot fit in 2 frames
