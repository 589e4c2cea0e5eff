"""Which token ids of a unit LM are units, and which are ``<s>``/``</s>``/``<pad>``: one object per loaded LM.

The toolkit's data format is ``u1 ... uN <s> y1 ... yM </s>``: unit ``u`` becomes token ``u + unit_offset``, the
separator is ``bos``, the end is ``eos`` and batches are padded with ``pad``. Each LM was trained with its own
layout, read from the files it ships with (see :mod:`speechprompt.models.speech_lm`):

==========================  =====  =====  =====  =====  ===========================================
LM                          bos    pad    eos    unk    unit ``u``
==========================  =====  =====  =====  =====  ===========================================
GSLM (fairseq ``dict.txt``) 0      1      2      3      ``u + 4``
TWIST/SLAM (slamkit)        1      0      1      --     ``u + 2`` (``max(pad, bos, eos) + 1``)
other HF causal LMs         from the tokenizer's unit tokens or given explicitly
==========================  =====  =====  =====  =====  ===========================================

``bos == eos`` (slamkit) is fine: ``</s>`` is only ever a target, ``<s>`` only an input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from speechprompt.errors import SpeechPromptError


class UnitVocabError(SpeechPromptError, ValueError):
    """Units that do not fit the LM's vocabulary, or a vocabulary whose unit layout cannot be determined."""


@dataclasses.dataclass(frozen=True)
class UnitVocab:
    """The unit layout of one LM's token vocabulary.

    Attributes:
        size: rows of the LM's embedding table (``V``).
        num_units: number of units ``K``; unit ``u`` in ``[0, K)`` is token ``u + unit_offset``.
        unit_offset: token id of unit 0 (units are contiguous).
        bos, eos, pad: the separator/start, end and padding token ids.
        unk: ``<unk>``'s id, if the vocabulary has one.
        layout: where it came from (``gslm``, ``slamkit``, ``hf``), for messages and checkpoints.
    """

    size: int
    num_units: int
    unit_offset: int
    bos: int
    eos: int
    pad: int
    unk: int | None = None
    layout: str = "gslm"

    def __post_init__(self) -> None:
        if self.num_units < 1 or self.unit_offset < 0 or self.unit_offset + self.num_units > self.size:
            raise UnitVocabError(f"{self.num_units} units from token {self.unit_offset} do not fit a vocabulary of "
                                 f"{self.size} tokens")
        specials = {"bos": self.bos, "eos": self.eos, "pad": self.pad}
        for name, token in specials.items():
            if not 0 <= token < self.size:
                raise UnitVocabError(f"{name} token {token} is outside the vocabulary of {self.size}")
            if self.is_unit(token):
                raise UnitVocabError(f"{name} token {token} is also a unit token")
        if self.pad in (self.bos, self.eos):
            raise UnitVocabError(f"the padding token {self.pad} must differ from <s>/</s> (padding is masked out)")

    @classmethod
    def gslm(cls, num_units: int) -> UnitVocab:
        """fairseq's GSLM dictionary: ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, unit ``u`` = ``u + 4``."""
        return cls(size=num_units + 4, num_units=num_units, unit_offset=4, bos=0, eos=2, pad=1, unk=3, layout="gslm")

    def token(self, unit: int) -> int:
        """Token id of ``unit``."""
        return unit + self.unit_offset

    def unit(self, token: int) -> int:
        """Unit of a unit ``token``."""
        return token - self.unit_offset

    def is_unit(self, token: int) -> bool:
        return self.unit_offset <= token < self.unit_offset + self.num_units

    @property
    def unit_tokens(self) -> range:
        """Every unit's token id, in unit order."""
        return range(self.unit_offset, self.unit_offset + self.num_units)

    @property
    def logit_columns(self) -> range:
        """The vocabulary columns a learnable verbalizer reads: the whole vocabulary when it holds only units and
        specials (GSLM's ``V = K + 4``, slamkit's ``K + 2``), else the unit slice (an LM that also knows text)."""
        if self.unit_offset + self.num_units == self.size and self.unit_offset <= 8:
            return range(self.size)
        return self.unit_tokens

    def check_units(self, units: Iterable[int], where: str = "") -> None:
        """Raise :class:`UnitVocabError` (one line) unless every unit id is in ``[0, num_units)``."""
        for u in units:
            if not 0 <= u < self.num_units:
                raise UnitVocabError(f"{where + ': ' if where else ''}unit {u} does not fit the LM's vocabulary of "
                                     f"{self.num_units} units ({self.layout} layout; units from another quantizer?)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UnitVocab:
        try:
            return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})
        except TypeError as e:
            raise UnitVocabError(f"not a unit vocabulary description: {e}") from None


def model_vocab(model: Any) -> UnitVocab:
    """The :class:`UnitVocab` of a loaded LM: its ``unit_vocab`` attribute, or GSLM's for a fairseq unit LM."""
    vocab = getattr(model, "unit_vocab", None)
    if isinstance(vocab, UnitVocab):
        return vocab
    return UnitVocab.gslm(model.cfg.vocab_size - 4)


__all__ = ["UnitVocab", "UnitVocabError", "model_vocab"]
