"""The learnable verbalizer of SpeechPrompt v2: a linear map from the unit LM's vocabulary logits to classes.

The LM reads ``u1 ... uN <s>``; its vocabulary logits at the ``<s>`` position, ``(B, V)``, go through
``Linear(V, C, bias=False)`` to class logits ``(B, C)``, trained with cross-entropy on the class index. No label
tokens are generated, so :meth:`LearnableVerbalizer.encode` is empty and ``target_length`` is 0.

Which columns it reads is the LM vocabulary's :attr:`~speechprompt.models.unit_vocab.UnitVocab.logit_columns`: the
whole vocabulary of a unit-only LM (GSLM's ``V = K + 4``, slamkit's ``K + 2``), or only the unit slice of an LM that
also knows text (a ``Linear(K, C)``: the other hundred thousand columns would be parameters with nothing to learn).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from speechprompt.models.unit_vocab import UnitVocab
from speechprompt.verbalizers.base import (
    FORMAT_VERSION,
    UNKNOWN_LABEL,
    Units,
    VerbalizerConfig,
    VerbalizerError,
    as_vocab,
    check_n_units,
    register_builder,
    register_loader,
    stored_vocab,
    unseen_label_error,
)
from speechprompt.verbalizers.fixed import FixedVerbalizer


class LearnableVerbalizer(nn.Module):
    """``Linear(V, C, bias=False)`` from vocabulary logits to class logits.

    Args:
        labels: The classes, in class-index order.
        n_units: Number of units K (the LM vocabulary is then GSLM's, ``V = K + 4`` tokens), or the LM's
            :class:`UnitVocab`.
        init_from: A fixed verbalizer with one token per label. Row ``c`` of the weight becomes the one-hot of
            label ``c``'s token, so at step 0 class ``c`` scores the LM's logit of that token: the softmax over
            classes, the loss and the argmax are then exactly those of the fixed verbalizer's constrained scoring
            (log-probabilities differ from logits by one shift per row, which a softmax ignores).
            ``None``: PyTorch's default ``Linear`` init, zero-mean uniform in ``+-1/sqrt(V)``.

    Shapes:
        input: ``(..., V)`` vocabulary logits. output: ``(..., C)`` class logits.
    """

    kind = "learnable"

    def __init__(self, labels: Sequence[str], n_units: Units, init_from: FixedVerbalizer | None = None) -> None:
        super().__init__()
        labels = list(labels)
        if not labels:
            raise VerbalizerError("a verbalizer needs at least one label")
        if len(set(labels)) != len(labels):
            raise VerbalizerError("labels of a learnable verbalizer must be distinct")
        if UNKNOWN_LABEL in labels:
            raise VerbalizerError(f"{UNKNOWN_LABEL!r} is reserved and cannot be a label")
        self.vocab = as_vocab(n_units)
        self.n_units = self.vocab.num_units
        self.columns = self.vocab.logit_columns
        self._labels = labels
        self._index = {label: i for i, label in enumerate(labels)}
        self.proj = nn.Linear(len(self.columns), len(labels), bias=False)
        if init_from is not None:
            self.init_from_fixed(init_from)

    @torch.no_grad()
    def init_from_fixed(self, fixed: FixedVerbalizer) -> None:
        """Make step 0 reproduce ``fixed``'s class scores (one-hot rows on each label's token)."""
        if fixed.target_length != 1:
            raise VerbalizerError(
                f"a learnable verbalizer can start only from a one-token fixed verbalizer; this one has "
                f"{fixed.target_length} tokens per label"
            )
        if fixed.n_units != self.n_units:
            raise VerbalizerError(f"verbalizer was built for {fixed.n_units} units but the model has {self.n_units}")
        missing = [label for label in self._labels if label not in set(fixed.labels)]
        if missing:
            raise VerbalizerError(f"the fixed verbalizer has no token for labels {missing[:8]}")
        self.proj.weight.zero_()
        for c, label in enumerate(self._labels):
            self.proj.weight[c, fixed.encode(label)[0] - self.columns.start] = 1.0

    def forward(self, vocab_logits: torch.Tensor) -> torch.Tensor:
        """Class logits ``(..., C)`` from vocabulary logits ``(..., V)``."""
        if vocab_logits.shape[-1] != self.vocab.size:
            raise VerbalizerError(
                f"expected vocabulary logits of size {self.vocab.size} ({self.n_units} units, "
                f"{self.vocab.layout} layout), got {vocab_logits.shape[-1]}"
            )
        if len(self.columns) != self.vocab.size:
            vocab_logits = vocab_logits[..., self.columns.start : self.columns.stop]  # (..., K): the unit slice
        return self.proj(vocab_logits)

    @torch.no_grad()
    def predict(self, vocab_logits: torch.Tensor) -> list[str]:
        """The most likely label of each row of ``(B, V)`` vocabulary logits."""
        return [self._labels[i] for i in self(vocab_logits).argmax(-1).tolist()]

    # -- the verbalizer interface -------------------------------------------------------------------------------

    @property
    def labels(self) -> list[str]:
        return list(self._labels)

    @property
    def target_length(self) -> int:
        return 0

    def index(self, label: str) -> int:
        """Class index of ``label``: the training target of the cross-entropy on :meth:`forward`'s output."""
        try:
            return self._index[label]
        except KeyError:
            raise unseen_label_error(label, self._labels) from None

    def encode(self, label: str) -> list[int]:
        """No tokens follow ``<s>``: the class is read from the logits at ``<s>``. Checks ``label`` is known."""
        self.index(label)
        return []

    def decode(self, ids: Sequence[int]) -> str:
        """Not available: this verbalizer reads classes from logits, not tokens. Use :meth:`predict`."""
        raise VerbalizerError("the learnable verbalizer decodes vocabulary logits, not tokens: use predict()")

    def candidates(self) -> torch.Tensor:
        """``(C, 0)``: no class has tokens to score."""
        return torch.zeros(len(self._labels), 0, dtype=torch.long)

    def check_vocab(self, n_tokens: int | UnitVocab) -> None:
        check_n_units(self.n_units, n_tokens)

    def to_dict(self) -> dict[str, Any]:
        """The structure only: the trained weight is a tensor and lives in the checkpoint's ``state_dict``."""
        return {"kind": self.kind, "format_version": FORMAT_VERSION, "n_units": self.n_units,
                "labels": list(self._labels)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], vocab: UnitVocab | None = None) -> LearnableVerbalizer:
        """Rebuild with a zero weight (every class ties until the checkpoint's ``state_dict`` is loaded)."""
        try:
            module = cls(d["labels"], stored_vocab(d, vocab))
        except KeyError as e:
            raise VerbalizerError(f"verbalizer description lacks {e.args[0]!r}") from None
        nn.init.zeros_(module.proj.weight)
        return module

    def extra_repr(self) -> str:
        return f"labels={len(self._labels)}, n_units={self.n_units}"


@register_builder("learnable")
def _build_learnable(cfg: VerbalizerConfig, train_labels: Sequence[str], train_units: Sequence[Sequence[int]],
                     n_units: Units) -> LearnableVerbalizer:
    if cfg.learnable_init == "random":
        if not train_labels:
            raise VerbalizerError("no training labels to build a verbalizer from")
        return LearnableVerbalizer(sorted(set(train_labels)), n_units)
    if cfg.learnable_init == "freq":
        fixed = FixedVerbalizer.fit_freq(train_labels, train_units, n_units)
    else:
        assert cfg.map_path is not None  # VerbalizerConfig checks it
        fixed = FixedVerbalizer.from_map_file(cfg.map_path, n_units)
        missing = sorted(set(train_labels) - set(fixed.labels))
        if missing:
            raise VerbalizerError(f"{cfg.map_path}: training labels missing from the map: {missing[:8]}")
    return LearnableVerbalizer(fixed.labels, n_units, init_from=fixed)


register_loader("learnable")(LearnableVerbalizer.from_dict)
