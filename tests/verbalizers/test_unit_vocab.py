"""Verbalizers on LM vocabularies other than GSLM's: slamkit's (pad 0, bos = eos 1, unit u = u + 2) and an HF LM
that also knows text (units at 10..41): token ids follow the LM, files keep unit ids, and a stored verbalizer rebuilt
on another LM's vocabulary with as many units gives that LM's token ids."""

from __future__ import annotations

import pytest
import torch

from speechprompt.models.unit_vocab import UnitVocab
from speechprompt.verbalizers import (
    FixedVerbalizer,
    LearnableVerbalizer,
    SequenceVerbalizer,
    VerbalizerConfig,
    VerbalizerError,
    build_verbalizer,
    verbalizer_from_dict,
)

SLAMKIT = UnitVocab(size=42, num_units=40, unit_offset=2, bos=1, eos=1, pad=0, layout="slamkit")
TEXT_LM = UnitVocab(size=42, num_units=32, unit_offset=10, bos=1, eos=2, pad=0, layout="hf")
LABELS = ["yes", "no", "yes", "stop", "yes", "no"]


def _train_units(vocab: UnitVocab) -> list[list[int]]:
    # Unit 7 is the most frequent, then 3, then 5.
    return [[vocab.token(u) for u in row] for row in ([7, 7, 3], [7, 5, 3], [7, 7, 7], [3, 5], [7], [3])]


def test_freq_verbalizer_speaks_the_lms_token_ids_and_stores_unit_ids():
    v = build_verbalizer(VerbalizerConfig(kind="freq"), LABELS, _train_units(SLAMKIT), SLAMKIT)
    assert v.encode("yes") == [7 + 2]  # most frequent label -> most frequent unit, as unit 7's token
    assert v.decode([9, 1, 5]) == "yes"  # stops at slamkit's </s> (1)
    d = v.to_dict()
    assert d["map"] == {"yes": [7], "no": [3], "stop": [5]} and d["n_units"] == 40
    # The same stored map on GSLM's layout (the default) and on a text LM with as many units.
    assert verbalizer_from_dict(d).encode("yes") == [7 + 4]
    same_units = UnitVocab(size=60, num_units=40, unit_offset=20, bos=1, eos=2, pad=0, layout="hf")
    assert verbalizer_from_dict(d, same_units).candidates().tolist() == [[23], [25], [27]]  # no, stop, yes
    with pytest.raises(VerbalizerError, match="built for 40 units but the model has 32"):
        verbalizer_from_dict(d, TEXT_LM)


def test_learnable_verbalizer_reads_the_unit_slice_of_a_text_lm():
    fixed = FixedVerbalizer({"yes": [7], "no": [3]}, TEXT_LM)
    v = LearnableVerbalizer(["yes", "no"], TEXT_LM, init_from=fixed)
    assert v.proj.in_features == 32  # the units only, not the 42 columns
    logits = torch.randn(3, 42)
    # Step 0 scores each class with its token's logit, as the fixed verbalizer does.
    assert torch.equal(v(logits), logits[:, [17, 13]])
    with pytest.raises(VerbalizerError, match="expected vocabulary logits of size 42"):
        v(torch.randn(3, 32))
    # A unit-only LM's learnable verbalizer reads its whole vocabulary (GSLM's K + 4, slamkit's K + 2).
    assert LearnableVerbalizer(["a", "b"], SLAMKIT).proj.in_features == 42
    assert LearnableVerbalizer(["a", "b"], 100).proj.in_features == 104
    rebuilt = verbalizer_from_dict(v.to_dict(), TEXT_LM)
    assert rebuilt.proj.in_features == 32


def test_sequence_verbalizer_pieces_are_unit_tokens_of_the_lm():
    texts = ["go up", "go down", "up up", "down"]
    units = [[SLAMKIT.token(u) for u in range(k, k + 5)] for k in range(4)]
    v = SequenceVerbalizer.fit(texts, units, SLAMKIT)
    ids = v.encode("go up")
    assert ids and all(SLAMKIT.is_unit(t) for t in ids)
    assert v.decode([*ids, SLAMKIT.eos, ids[0]]) == "go up"  # slamkit's </s> ends it
    assert all(0 <= u < 40 for _, u in v.pieces())
    assert verbalizer_from_dict(v.to_dict(), SLAMKIT).encode("go up") == ids
