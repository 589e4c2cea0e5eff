import json
import re
from pathlib import Path

import pytest
import torch

from speechprompt.config import ConfigError, from_dict
from speechprompt.verbalizers import (
    EOS,
    NSPECIAL,
    UNKNOWN_LABEL,
    FixedVerbalizer,
    VerbalizerConfig,
    VerbalizerError,
    build_verbalizer,
    unit_ranking,
    verbalizer_from_dict,
)

REPO = Path(__file__).resolve().parents[2]
K = 100

# Units (as token ids) 10, 20, 30, 40 (tokens 14, 24, 34, 44) seen 10, 8, 8 and 1 times: 20 and 30 tie.
TRAIN_UNITS = [[14] * 10 + [24] * 4, [34] * 8 + [24] * 4, [44]]
# yes x5, no x3, up x3 (tie with no), down x1.
TRAIN_LABELS = ["yes"] * 5 + ["up"] * 3 + ["no"] * 3 + ["down"]


def roundtrip(v):
    return verbalizer_from_dict(json.loads(json.dumps(v.to_dict())))


def test_unit_ranking_breaks_ties_by_id_and_ranks_unseen_units_last():
    ranking = unit_ranking(TRAIN_UNITS, K)
    assert ranking[:5] == [14, 24, 34, 44, 4]
    assert sorted(ranking) == list(range(NSPECIAL, NSPECIAL + K))


def test_unit_ranking_rejects_raw_unit_ids():
    with pytest.raises(VerbalizerError, match="token id 2, which is not a unit token"):
        unit_ranking([[5, 2, 7]], K)
    with pytest.raises(VerbalizerError, match="not a unit token"):
        unit_ranking([[K + NSPECIAL]], K)


def test_freq_maps_frequent_labels_to_frequent_units():
    v = FixedVerbalizer.fit_freq(TRAIN_LABELS, TRAIN_UNITS, K)
    # Label ranking yes, no, up (tie with no: by string), down; unit ranking 10, 20, 30, 40.
    assert v.to_dict()["map"] == {"down": [40], "no": [20], "up": [30], "yes": [10]}
    assert v.labels == ["down", "no", "up", "yes"]  # class order: sorted labels
    assert v.encode("yes") == [14]
    assert v.target_length == 1
    assert v.kind == "freq"


def test_round_trip_is_exact_including_to_dict_and_back():
    v = FixedVerbalizer.fit_freq(TRAIN_LABELS, TRAIN_UNITS, K)
    w = roundtrip(v)
    assert isinstance(w, FixedVerbalizer) and w.kind == "freq"
    for label in v.labels:
        assert v.decode(v.encode(label)) == label
        assert w.decode(v.encode(label)) == label
        assert w.encode(label) == v.encode(label)
    assert torch.equal(w.candidates(), v.candidates())
    assert w.labels == v.labels


def test_candidates_are_the_encodings_in_label_order():
    v = FixedVerbalizer.fit_freq(TRAIN_LABELS, TRAIN_UNITS, K)
    cands = v.candidates()
    assert cands.shape == (4, 1) and cands.dtype == torch.long
    assert [cands[v.index(label)].tolist() for label in v.labels] == [v.encode(label) for label in v.labels]


def test_decode_ignores_eos_and_returns_a_sentinel_for_unknown_sequences():
    v = FixedVerbalizer.fit_freq(TRAIN_LABELS, TRAIN_UNITS, K)
    assert v.decode([14, EOS, 99, 98]) == "yes"
    assert v.decode([99]) == UNKNOWN_LABEL
    assert v.decode([14, 14]) == UNKNOWN_LABEL
    assert v.decode([]) == UNKNOWN_LABEL
    with pytest.raises(VerbalizerError, match=r"token ids \[99\] are the target of no label"):
        v.decode([99], strict=True)


def test_unseen_label_error_names_it_and_lists_known_labels():
    v = FixedVerbalizer.fit_freq(TRAIN_LABELS, TRAIN_UNITS, K)
    with pytest.raises(VerbalizerError, match=r"label 'left' was not seen.*known labels: 'down', 'no'"):
        v.encode("left")
    with pytest.raises(VerbalizerError, match="'left'"):
        v.index("left")


def test_random_is_seeded_injective_and_in_range():
    labels = [f"w{i}" for i in range(30)]
    a = FixedVerbalizer.fit_random(labels, K, seed=1)
    assert a.to_dict() == FixedVerbalizer.fit_random(list(reversed(labels)), K, seed=1).to_dict()
    assert a.to_dict() != FixedVerbalizer.fit_random(labels, K, seed=2).to_dict()
    tokens = [a.encode(label)[0] for label in labels]
    assert len(set(tokens)) == 30 and all(NSPECIAL <= t < NSPECIAL + K for t in tokens)
    assert roundtrip(a).decode(a.encode("w7")) == "w7"


def test_more_labels_than_units_is_an_error():
    with pytest.raises(VerbalizerError, match="5 labels need distinct units but the unit LM has only 4"):
        FixedVerbalizer.fit_random([str(i) for i in range(5)], 4)


FSC = ["activate|lights|kitchen"] * 4 + ["activate|lights|none"] * 3 + ["bring|shoes|none"] * 2 + [
    "change language|none|none",
    "deactivate|lamp|none",
]


def test_multi_slot_freq_ranks_per_slot_and_deals_units_rank_by_rank():
    units = [[4 + u] * (100 - u) for u in range(12)]  # unit u is the u-th most frequent
    v = FixedVerbalizer.fit_freq(FSC, units, K, slot_separator="|")
    # Slot ranks: action activate(7) bring(2) change language(1) deactivate(1); object lights(7) shoes(2)
    # lamp(1) none(1); location none(7) kitchen(4). Dealt: rank 0 of each slot -> units 0, 1, 2; rank 1 -> 3, 4, 5
    # ("kitchen" is location's rank 1); rank 2 -> 6 (change language), 7 (lamp); rank 3 -> 8, 9.
    m = v.to_dict()["map"]
    assert m["activate|lights|none"] == [0, 1, 2]
    assert m["activate|lights|kitchen"] == [0, 1, 5]
    assert m["bring|shoes|none"] == [3, 4, 2]
    assert m["change language|none|none"] == [6, 9, 2]
    assert m["deactivate|lamp|none"] == [8, 7, 2]
    assert v.target_length == 3 and v.candidates().shape == (5, 3)


@pytest.mark.parametrize("kind", ["freq", "random"])
def test_multi_slot_value_in_two_slots_decodes_by_position(kind):
    cfg = VerbalizerConfig(kind=kind, slot_separator="|", seed=3)
    v = build_verbalizer(cfg, FSC, [[4, 5, 6]], K)
    # "none" as object and "none" as location are different units.
    obj_none = v.encode("change language|none|none")[1]
    loc_none = v.encode("change language|none|none")[2]
    assert obj_none != loc_none
    assert v.encode("bring|shoes|none")[2] == loc_none
    w = roundtrip(v)
    for label in set(FSC):
        assert w.decode(v.encode(label)) == label
    # The same tokens in other positions are no label.
    a, b, c = v.encode("change language|none|none")
    assert v.decode([a, c, b]) == UNKNOWN_LABEL


def test_multi_slot_labels_need_the_same_number_of_slots():
    with pytest.raises(VerbalizerError, match=re.escape("label 'a|b|c' has 3 slots but 'a|b' has 2")):
        FixedVerbalizer.fit_random(["a|b|c", "a|b"], K, slot_separator="|")


def test_map_bare_and_wrapped_forms():
    bare = FixedVerbalizer.from_map({"yes": [3], "no": 7}, K)
    assert bare.encode("no") == [11] and bare.labels == ["yes", "no"]
    wrapped = FixedVerbalizer.from_map({"n_units": K, "description": "x", "map": {"a": [1, 2], "b": [2, 1]}}, K)
    assert wrapped.target_length == 2 and wrapped.decode([6, 5]) == "b"
    assert roundtrip(wrapped).to_dict() == wrapped.to_dict()


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"a": [100]}, "unit 100 is not a unit id in 0..99"),
        ({"a": [-1]}, "unit -1"),
        ({"a": [True]}, "unit True"),
        ({"a": [1], "b": [1]}, r"labels 'a' and 'b' both map to units \[1\]"),
        ({"a": [1], "b": [2, 3]}, "has 2 units but the others have 1"),
        ({"a": []}, "non-empty list"),
        ({}, "at least one label"),
        ({"<unk>": [1]}, "not allowed"),
        ({"n_units": 50, "map": {"a": [1]}}, "verbalizer was built for 50 units but the model has 100"),
        ({"map": {"a": [1]}, "extra": 1}, "unknown key 'extra'"),
    ],
)
def test_map_validation(mapping, message):
    with pytest.raises(VerbalizerError, match=message):
        FixedVerbalizer.from_map(mapping, K)


def test_map_file_builder_checks_training_labels(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"yes": [1], "no": [2]}))
    v = build_verbalizer(VerbalizerConfig(kind="map", map_path=str(path)), ["yes", "no", "yes"], [], K)
    assert v.kind == "map" and v.encode("yes") == [5]
    with pytest.raises(VerbalizerError, match="training labels missing from the map: 'up'"):
        build_verbalizer(VerbalizerConfig(kind="map", map_path=str(path)), ["yes", "up"], [], K)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(VerbalizerError, match="bad.json: not valid JSON"):
        FixedVerbalizer.from_map_file(tmp_path / "bad.json", K)
    with pytest.raises(VerbalizerError, match="cannot read verbalizer map"):
        FixedVerbalizer.from_map_file(tmp_path / "missing.json", K)


@pytest.mark.parametrize("path", sorted((REPO / "verbalizers").glob("*.json")), ids=lambda p: p.name)
def test_shipped_maps_load_and_round_trip(path):
    data = json.loads(path.read_text())
    v = FixedVerbalizer.from_map_file(path, data["n_units"])
    for label in v.labels:
        assert v.decode(v.encode(label)) == label


def test_check_vocab():
    v = FixedVerbalizer.fit_random(["a", "b"], K)
    v.check_vocab(K + NSPECIAL)
    with pytest.raises(VerbalizerError, match="verbalizer was built for 100 units but the model has 50"):
        v.check_vocab(54)


def test_config_checks_itself():
    assert from_dict(VerbalizerConfig, {"kind": "random", "seed": 3}).seed == 3
    with pytest.raises(ConfigError, match="kind=map needs map_path"):
        from_dict(VerbalizerConfig, {"kind": "map"})
    with pytest.raises(ConfigError, match="not one of"):
        from_dict(VerbalizerConfig, {"kind": "bogus"})
    with pytest.raises(ConfigError, match="learnable_init"):
        from_dict(VerbalizerConfig, {"kind": "learnable", "learnable_init": "zeros"})


def test_from_dict_rejects_unknown_kinds_and_newer_formats():
    with pytest.raises(VerbalizerError, match="unknown verbalizer kind 'nope'"):
        verbalizer_from_dict({"kind": "nope"})
    with pytest.raises(VerbalizerError, match="newer than this toolkit reads"):
        verbalizer_from_dict({"kind": "freq", "format_version": 99})
    with pytest.raises(VerbalizerError, match="lacks 'map'"):
        verbalizer_from_dict({"kind": "freq", "n_units": 3})
