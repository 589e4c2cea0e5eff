"""Character CTC: the vocabulary, the loss on padded batches, and greedy decoding.

The vocabulary is fairseq's/SUPERB's letter dictionary in spirit: index 0 is the CTC blank, then one symbol per
character seen in the training transcripts, with the word boundary (a space) written ``|``. Transcripts are
whitespace-normalised (stripped, runs of spaces collapsed) before they are encoded, so that a decoded string and
its reference compare as WER/CER expect.

Example:
    >>> vocab = CharVocabulary.from_texts(["yes no", "no"])
    >>> vocab.encode("no yes")
    [2, 3, 6, 5, 1, 4]
    >>> vocab.decode([2, 3, 6, 5, 1, 4])
    'no yes'
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from speechprompt.errors import SpeechPromptError

BLANK = "<blank>"
WORD_BOUNDARY = "|"


class CTCError(SpeechPromptError, ValueError):
    """A transcript the vocabulary cannot encode, or a vocabulary that cannot be rebuilt."""


def normalize_text(text: str) -> str:
    """Strip and collapse whitespace: what a CTC model can output and what WER/CER compare."""
    return " ".join(text.split())


class CharVocabulary:
    """Characters <-> CTC output indices; index 0 is the blank.

    Args:
        symbols: the non-blank symbols in index order (index ``i + 1``); a space is written ``|``.
    """

    blank = 0

    def __init__(self, symbols: Sequence[str]) -> None:
        symbols = list(symbols)
        if len(set(symbols)) != len(symbols) or any(len(s) != 1 for s in symbols) or " " in symbols:
            raise CTCError(f"CTC symbols must be distinct single characters without ' ' (use '|'), got {symbols!r}")
        self.symbols = symbols
        self._index = {s: i + 1 for i, s in enumerate(symbols)}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharVocabulary:
        """Every character of ``texts`` (after :func:`normalize_text`), sorted, spaces as ``|``."""
        chars = {WORD_BOUNDARY if c == " " else c for text in texts for c in normalize_text(text)}
        if not chars:
            raise CTCError("the training transcripts are all empty: no CTC vocabulary can be built")
        return cls(sorted(chars))

    def __len__(self) -> int:
        """Output size, the blank included."""
        return len(self.symbols) + 1

    def encode(self, text: str) -> list[int]:
        """Indices of ``text``'s characters.

        Raises:
            CTCError: a character outside the vocabulary (the message lists them).
        """
        text = normalize_text(text)
        unknown = sorted({c for c in text if c != " " and c not in self._index})
        if unknown or (" " in text and WORD_BOUNDARY not in self._index):
            raise CTCError(f"transcript {text!r} has characters outside the CTC vocabulary: {unknown or [' ']}")
        return [self._index[WORD_BOUNDARY if c == " " else c] for c in text]

    def decode(self, indices: Iterable[int]) -> str:
        """Text of non-blank indices (already collapsed, see :func:`greedy_decode`), whitespace-normalised."""
        chars = [self.symbols[i - 1] for i in indices if i != self.blank]
        return normalize_text("".join(chars).replace(WORD_BOUNDARY, " "))

    def to_dict(self) -> dict[str, Any]:
        """What a checkpoint sidecar stores to rebuild this vocabulary."""
        return {"blank": BLANK, "symbols": list(self.symbols)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CharVocabulary:
        symbols = data.get("symbols")
        if not isinstance(symbols, list) or not all(isinstance(s, str) for s in symbols):
            raise CTCError(f"not a CTC vocabulary: {data!r}")
        return cls(symbols)


def ctc_loss(log_probs: Tensor, frame_lengths: Tensor, targets: Sequence[Sequence[int]], blank: int = 0) -> tuple[
        Tensor, int]:
    """The CTC loss of each utterance divided by its target length, summed over the batch, and the batch size.

    The mean (the sum over the batch size) is torch's ``reduction="mean"``; trainers take the sum so that they can
    normalise over a whole update (micro-batches and processes).

    Args:
        log_probs: ``(B, frames, V)`` log-softmax outputs.
        frame_lengths: ``(B,)`` valid frames per utterance.
        targets: ``B`` index sequences (no blanks).
        blank: the blank index.

    An utterance with fewer frames than CTC needs for its target (its length plus one frame between repeated
    symbols) has no alignment; its loss is set to zero (``zero_infinity``) rather than poisoning the batch.
    """
    if len(targets) != log_probs.shape[0]:
        raise ValueError(f"{len(targets)} targets for a batch of {log_probs.shape[0]}")
    target_lengths = torch.tensor([len(t) for t in targets], dtype=torch.long)
    flat = torch.tensor([i for t in targets for i in t], dtype=torch.long)  # (sum of target lengths,)
    per_utterance = F.ctc_loss(
        log_probs.transpose(0, 1).float(),  # (frames, B, V), as torch wants it
        flat.to(log_probs.device),
        frame_lengths.to(torch.long),
        target_lengths,
        blank=blank,
        reduction="none",
        zero_infinity=True,
    )  # (B,)
    return (per_utterance / target_lengths.clamp(min=1).to(per_utterance)).sum(), len(targets)


def greedy_decode(log_probs: Tensor, frame_lengths: Tensor, blank: int = 0) -> list[list[int]]:
    """Best path: argmax per frame, merge repeats, drop blanks.

    Args:
        log_probs: ``(B, frames, V)`` scores (any monotone transform of the probabilities).
        frame_lengths: ``(B,)`` valid frames per utterance; frames beyond are ignored.

    Returns:
        ``B`` index sequences.
    """
    best = log_probs.argmax(dim=-1).cpu()  # (B, frames)
    out = []
    for row, n in zip(best.tolist(), frame_lengths.tolist()):
        path = row[: int(n)]
        out.append([i for j, i in enumerate(path) if i != blank and (j == 0 or i != path[j - 1])])
    return out
