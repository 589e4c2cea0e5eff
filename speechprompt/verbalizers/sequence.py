"""The sequence verbalizer: text <-> sentencepiece pieces <-> unit tokens, for ASR and slot filling.

A sentencepiece model with at most K pieces is trained on the task's training text, and pieces are mapped to
units by frequency rank: the most frequent piece of the tokenized training text gets the most frequent unit of
the training inputs (ties: the smaller piece id, the smaller unit id). Slot tags of SUPERB's SNIPS format
(``B-artist ... E-artist`` inside the text) are kept whole as sentencepiece user-defined symbols.

Text is compared after whitespace normalisation (runs of spaces collapse, ends are trimmed): sentencepiece does
the same, so ``decode(encode(t)) == " ".join(t.split())`` for every text whose characters occur in training.
Characters never seen in training become sentencepiece's unknown piece, which decodes as ``" ⁇ "``.
"""

from __future__ import annotations

import base64
import collections
import io
import re
from collections.abc import Iterable, Sequence
from typing import Any

import sentencepiece as spm
import torch

from speechprompt.models.unit_vocab import UnitVocab
from speechprompt.verbalizers.base import (
    FORMAT_VERSION,
    Units,
    VerbalizerConfig,
    VerbalizerError,
    as_vocab,
    check_n_units,
    register_builder,
    register_loader,
    stored_vocab,
    strip_eos,
    unit_ranking,
)

_TOO_HIGH = re.compile(r"Please set it to a value <= (\d+)")
_TOO_LOW = re.compile(r"smaller than required_chars\. (\d+) vs (\d+)")


def normalize_text(text: str) -> str:
    """The form every text is compared in: words separated by single spaces."""
    return " ".join(text.split())


class SequenceVerbalizer:
    """Text <-> unit tokens through a sentencepiece model whose pieces are assigned to units.

    Args:
        model_proto: The serialized sentencepiece model.
        piece_to_unit: Unit id of every piece id (injective, ``len == vocab size <= n_units``).
        n_units: Number of units K of the unit LM's dictionary, or its :class:`UnitVocab`.
    """

    kind = "sequence"

    def __init__(self, model_proto: bytes, piece_to_unit: Sequence[int], n_units: Units) -> None:
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._proto = bytes(model_proto)
        self.vocab = as_vocab(n_units)
        self.n_units = n_units = self.vocab.num_units
        self._piece_to_token = [self.vocab.token(int(u)) for u in piece_to_unit]
        if len(self._piece_to_token) != self.sp.get_piece_size():
            raise VerbalizerError(
                f"piece_to_unit has {len(self._piece_to_token)} entries but the sentencepiece model has "
                f"{self.sp.get_piece_size()} pieces"
            )
        if any(not self.vocab.is_unit(t) for t in self._piece_to_token):
            raise VerbalizerError(f"piece_to_unit holds a unit outside 0..{n_units - 1}")
        self._token_to_piece = {t: p for p, t in enumerate(self._piece_to_token)}
        if len(self._token_to_piece) != len(self._piece_to_token):
            raise VerbalizerError("piece_to_unit maps two pieces to one unit")

    @classmethod
    def fit(
        cls,
        texts: Sequence[str],
        train_units: Iterable[Sequence[int]],
        n_units: Units,
        model_type: str = "unigram",
        vocab_size: int | None = None,
        user_symbols: Sequence[str] = (),
        tag_pattern: str | None = None,
    ) -> SequenceVerbalizer:
        """Train sentencepiece on ``texts`` and assign pieces to units by frequency rank.

        Args:
            texts: Training transcripts, one per utterance.
            train_units: Training inputs as unit token ids (unit + 4).
            n_units: Number of units K (the most pieces there can be).
            model_type: ``unigram`` or ``bpe``.
            vocab_size: Pieces wanted (default K). It is lowered to what the text supports when the text has
                fewer distinct pieces.
            user_symbols: Strings always kept as one piece (slot tags).
            tag_pattern: A regex; every word of ``texts`` matching it fully is added to ``user_symbols``.

        Raises:
            VerbalizerError: the text needs more pieces (distinct characters and symbols) than there are units.
        """
        texts = [normalize_text(t) for t in texts]
        corpus = [t for t in texts if t]
        if not corpus:
            raise VerbalizerError("no training text to build a sequence verbalizer from")
        symbols = set(user_symbols)
        if tag_pattern:
            tag = re.compile(tag_pattern)
            symbols.update(w for t in corpus for w in t.split() if tag.fullmatch(w))
        K = as_vocab(n_units).num_units
        requested = min(vocab_size or K, K)
        proto = _train_sentencepiece(corpus, requested, model_type, sorted(symbols), K)
        sp = spm.SentencePieceProcessor(model_proto=proto)
        counts = collections.Counter(p for t in corpus for p in sp.encode(t))
        ranked_pieces = sorted(range(sp.get_piece_size()), key=lambda p: (-counts[p], p))
        ranked_units = unit_ranking(train_units, n_units)
        piece_to_unit = [0] * sp.get_piece_size()
        for rank, piece in enumerate(ranked_pieces):
            piece_to_unit[piece] = ranked_units[rank] - as_vocab(n_units).unit_offset
        return cls(proto, piece_to_unit, n_units)

    # -- the verbalizer interface -------------------------------------------------------------------------------

    @property
    def labels(self) -> list[str]:
        """Empty: a sequence task has no closed label set."""
        return []

    @property
    def target_length(self) -> None:
        return None

    @property
    def vocab_size(self) -> int:
        """Number of sentencepiece pieces (each one unit)."""
        return self.sp.get_piece_size()

    def pieces(self) -> list[tuple[str, int]]:
        """``(piece, unit id)`` of every piece, in piece-id order."""
        return [(self.sp.id_to_piece(p), self.vocab.unit(t)) for p, t in enumerate(self._piece_to_token)]

    def encode(self, text: str) -> list[int]:
        """Token ids (unit + 4) of ``text``, without ``<s>`` or ``</s>``."""
        return [self._piece_to_token[p] for p in self.sp.encode(normalize_text(text))]

    def decode(self, ids: Sequence[int], strict: bool = False) -> str:
        """Text of emitted token ids; a ``</s>`` and anything after it are ignored.

        Args:
            ids: Token ids emitted after ``<s>``.
            strict: Raise on a token that is no piece (a special token, or a unit beyond the vocabulary)
                instead of dropping it.
        """
        pieces = []
        for t in strip_eos(ids, self.vocab.eos):
            piece = self._token_to_piece.get(t)
            if piece is None:
                if strict:
                    raise VerbalizerError(f"token id {t} is no sentencepiece piece")
                continue
            pieces.append(piece)
        return self.sp.decode(pieces)

    def candidates(self) -> torch.Tensor:
        raise VerbalizerError("a sequence task has no fixed candidates to score: generate and decode() instead")

    def check_vocab(self, n_tokens: int | UnitVocab) -> None:
        check_n_units(self.n_units, n_tokens)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable and self-contained: the sentencepiece model is inside, base64-encoded."""
        return {
            "kind": self.kind,
            "format_version": FORMAT_VERSION,
            "n_units": self.n_units,
            "piece_to_unit": [self.vocab.unit(t) for t in self._piece_to_token],
            "sentencepiece_model": base64.b64encode(self._proto).decode("ascii"),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], vocab: UnitVocab | None = None) -> SequenceVerbalizer:
        try:
            proto = base64.b64decode(d["sentencepiece_model"], validate=True)
            return cls(proto, d["piece_to_unit"], stored_vocab(d, vocab))
        except KeyError as e:
            raise VerbalizerError(f"verbalizer description lacks {e.args[0]!r}") from None
        except (ValueError, RuntimeError) as e:
            raise VerbalizerError(f"the stored sentencepiece model cannot be read: {e}") from None

    def __repr__(self) -> str:
        return f"SequenceVerbalizer(pieces={self.vocab_size}, n_units={self.n_units})"


def _train_sentencepiece(
    corpus: list[str], vocab_size: int, model_type: str, user_symbols: list[str], n_units: int
) -> bytes:
    """Train and return the serialized model, lowering ``vocab_size`` to what the corpus supports."""
    for _ in range(3):  # the second try uses the size sentencepiece reports; a third is a safety net
        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(corpus),
                model_writer=buf,
                vocab_size=vocab_size,
                model_type=model_type,
                user_defined_symbols=user_symbols,
                byte_fallback=False,
                character_coverage=1.0,
                # Only <unk>: the unit LM has its own <s>, </s> and <pad>, and every piece costs a unit.
                unk_id=0,
                bos_id=-1,
                eos_id=-1,
                pad_id=-1,
                # Keep characters as written (the default NFKC would rewrite some), so texts round-trip.
                normalization_rule_name="identity",
                max_sentence_length=max(4192, max(len(t.encode("utf-8")) for t in corpus) + 1),
                num_threads=1,  # deterministic
                minloglevel=2,
            )
        except RuntimeError as e:
            message = str(e)
            too_high = _TOO_HIGH.search(message)
            if too_high and int(too_high.group(1)) < vocab_size:
                vocab_size = int(too_high.group(1))
                continue
            too_low = _TOO_LOW.search(message)
            if too_low:
                raise VerbalizerError(
                    f"the training text needs at least {too_low.group(2)} pieces (its distinct characters, "
                    f"user symbols and <unk>) but only {vocab_size} are allowed with {n_units} units"
                ) from None
            raise VerbalizerError(f"sentencepiece training failed: {message}") from None
        return buf.getvalue()
    raise VerbalizerError(f"sentencepiece training did not settle on a vocabulary size (last tried {vocab_size})")


@register_builder("sequence")
def _build_sequence(cfg: VerbalizerConfig, train_labels: Sequence[str], train_units: Sequence[Sequence[int]],
                    n_units: Units) -> SequenceVerbalizer:
    return SequenceVerbalizer.fit(
        train_labels,
        train_units,
        n_units,
        model_type=cfg.sp_model_type,
        vocab_size=cfg.sp_vocab_size,
        user_symbols=cfg.user_symbols,
        tag_pattern=cfg.tag_pattern,
    )


register_loader("sequence")(SequenceVerbalizer.from_dict)
