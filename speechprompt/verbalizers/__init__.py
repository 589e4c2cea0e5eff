"""Verbalizers: task labels <-> the unit tokens a frozen unit LM emits after ``<s>``.

* :class:`FixedVerbalizer` (``freq``, ``random``, ``map``): a label is a fixed-length unit sequence.
* :class:`LearnableVerbalizer` (``learnable``): ``Linear(V, C)`` on the LM's vocabulary logits (SpeechPrompt v2).
* :class:`SequenceVerbalizer` (``sequence``): sentencepiece pieces <-> units, for ASR and slot filling.

Build one from a training split with :func:`build_verbalizer`, store it with ``to_dict()`` and rebuild any kind
with :func:`verbalizer_from_dict`.
"""

from speechprompt.verbalizers.base import (
    BOS,
    EOS,
    NSPECIAL,
    PAD,
    UNK,
    UNKNOWN_LABEL,
    Verbalizer,
    VerbalizerConfig,
    VerbalizerError,
    VerbalizerKind,
    build_verbalizer,
    register_builder,
    register_loader,
    unit_ranking,
    verbalizer_from_dict,
)
from speechprompt.verbalizers.fixed import FixedVerbalizer
from speechprompt.verbalizers.learnable import LearnableVerbalizer
from speechprompt.verbalizers.sequence import SequenceVerbalizer

__all__ = [
    "BOS",
    "EOS",
    "NSPECIAL",
    "PAD",
    "UNK",
    "UNKNOWN_LABEL",
    "FixedVerbalizer",
    "LearnableVerbalizer",
    "SequenceVerbalizer",
    "Verbalizer",
    "VerbalizerConfig",
    "VerbalizerError",
    "VerbalizerKind",
    "build_verbalizer",
    "register_builder",
    "register_loader",
    "unit_ranking",
    "verbalizer_from_dict",
]
