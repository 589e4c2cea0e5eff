import math
import random

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import f1_score

from speechprompt.tasks.metrics import (
    METRICS,
    MetricError,
    accuracy,
    cer,
    compute_metrics,
    confusion_matrix,
    edit_distance,
    macro_f1,
    parse_slots,
    slot_type_f1,
    slot_value_cer,
    strip_slot_tags,
    wer,
)

Y_TRUE = ["a", "b", "c", "a"]
Y_PRED = ["a", "c", "c", "b"]


def test_accuracy():
    assert accuracy(Y_TRUE, Y_PRED) == 0.5
    assert accuracy([1, 2], [1, 2]) == 1.0


def test_macro_f1_by_hand_and_against_sklearn():
    # a: TP 1, FP 0, FN 1 -> 2/3; b: TP 0 -> 0; c: TP 1, FP 1, FN 0 -> 2/3.
    assert macro_f1(Y_TRUE, Y_PRED) == pytest.approx(4 / 9)
    rng = random.Random(0)
    labels = ["x", "y", "z", "w"]
    y_true = [rng.choice(labels[:3]) for _ in range(200)]
    y_pred = [rng.choice(labels) for _ in range(200)]
    assert macro_f1(y_true, y_pred) == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    # A listed class that never occurs counts as F1 0, as scikit-learn's zero_division=0.
    assert macro_f1(["x"], ["x"], labels=["x", "never"]) == 0.5
    assert f1_score(["x"], ["x"], labels=["x", "never"], average="macro", zero_division=0) == 0.5


def test_confusion_matrix_rows_are_references():
    m = confusion_matrix(Y_TRUE, Y_PRED, ["a", "b", "c"])
    np.testing.assert_array_equal(m, [[1, 1, 0], [0, 0, 1], [0, 0, 1]])
    assert m.dtype == np.int64
    np.testing.assert_array_equal(m, sk_confusion_matrix(Y_TRUE, Y_PRED, labels=["a", "b", "c"]))
    assert confusion_matrix([], [], ["a"]).tolist() == [[0]]


def test_confusion_matrix_refuses_to_drop_unknown_predictions():
    with pytest.raises(MetricError, match=r"prediction '<unk>' is not in"):
        confusion_matrix(["a"], ["<unk>"], ["a", "b"])
    assert confusion_matrix(["a"], ["<unk>"], ["a", "<unk>"]).tolist() == [[0, 1], [0, 0]]


def _naive_edit_distance(a, b):
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return d[-1][-1]


def test_edit_distance_cases():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3
    assert edit_distance("abc", "") == 3
    assert edit_distance([], []) == 0
    assert edit_distance("abc", "abc") == 0
    assert edit_distance("ab", "ba") == 2
    assert edit_distance(["the", "cat", "sat"], ["a", "cat", "sat", "down"]) == 2


def test_edit_distance_matches_naive_dynamic_programming():
    rng = random.Random(1)
    for _ in range(200):
        a = [rng.choice("abcd") for _ in range(rng.randrange(0, 12))]
        b = [rng.choice("abcde") for _ in range(rng.randrange(0, 12))]
        assert edit_distance(a, b) == _naive_edit_distance(a, b), (a, b)


def test_wer_is_corpus_level():
    # 1 insertion + 1 deletion over 4 reference words (a per-utterance mean would give (1/3 + 1) / 2).
    assert wer(["the cat sat", "hello"], ["the cat sat down", ""]) == 0.5


def test_wer_empty_hypothesis_and_empty_reference():
    assert wer(["a b c"], [""]) == 1.0
    assert wer(["", "a b"], ["x", "a b"]) == 0.5  # the insertion against an empty reference counts
    assert wer([""], [""]) == 0.0
    assert math.isinf(wer([""], ["x"]))


def test_cer_counts_spaces_and_normalises_whitespace():
    assert cer(["abc", "de"], ["abd", "de f"]) == pytest.approx(3 / 5)
    assert cer(["a  b "], ["a b"]) == 0.0
    assert cer(["ab"], [""]) == 1.0


@pytest.mark.parametrize("fn", [accuracy, macro_f1, wer, cer, slot_type_f1, slot_value_cer])
def test_metrics_reject_mismatched_or_empty_inputs(fn):
    with pytest.raises(MetricError, match="2 references but 1 hypotheses"):
        fn(["a", "b"], ["a"])
    with pytest.raises(MetricError, match="no examples"):
        fn([], [])


REFS = [
    "add B-artist lil wayne E-artist to B-playlist my workout E-playlist",
    "play some music",
    "play B-artist adele E-artist",
    "",
]
HYPS = [
    "add B-artist lil wain E-artist to B-playlist my workout E-playlist B-music_item song E-music_item",
    "play some music",
    "play adele",
    "B-artist x E-artist",
]


def test_parse_slots_and_strip_tags():
    assert parse_slots(REFS[0]) == [("artist", "lil wayne"), ("playlist", "my workout")]
    assert parse_slots("B-artist  lil   wayne  E-artist") == [("artist", "lil wayne")]  # spaces collapse
    assert parse_slots("B-artist lil B-x wayne E-artist", clean_values=True) == [("artist", "lil wayne")]
    assert parse_slots("B-artist lil B-x wayne E-artist") == [("artist", "lil B-x wayne")]
    assert parse_slots("B-artist unclosed") == []
    assert strip_slot_tags(REFS[0]) == "add lil wayne to my workout"


def test_slot_type_f1_by_hand():
    # 1: types {artist, playlist} vs {artist, playlist, music_item}: P 2/3, R 1, F1 0.8.
    # 2: no slots on either side: 1.0. 3: hypothesis has none: 0.0. 4: reference has none: 0.0.
    assert slot_type_f1(REFS, HYPS) == pytest.approx((0.8 + 1.0 + 0.0 + 0.0) / 4)
    assert slot_type_f1(["B-a x E-a"], ["B-b x E-b"]) == 0.0


def test_slot_value_cer_by_hand():
    # "lil wayne" vs "lil wain": 2 edits; "my workout": 0; "adele" with no artist predicted: 5 edits.
    # Reference characters: 9 + 10 + 5. Hypothesis types absent from the reference are not counted.
    assert slot_value_cer(REFS, HYPS) == pytest.approx(7 / 24)


def test_slot_value_cer_takes_the_closest_value_of_the_type():
    ref = ["fly to B-city paris E-city"]
    assert slot_value_cer(ref, ["B-city london E-city and B-city pariss E-city"]) == pytest.approx(1 / 5)
    assert slot_value_cer(ref, ["fly to B-town paris E-town"]) == 1.0  # wrong type: the value is missed


def test_slot_metrics_edge_cases():
    assert slot_value_cer(["no slots here"], ["B-a b E-a"]) == 0.0  # s3prl would divide by zero
    assert slot_type_f1(["B-time 10:30 E-time"], ["B-time 10:30 E-time"]) == 1.0  # ':' no longer crashes
    assert slot_value_cer(["B-time 10:30 E-time"], ["B-time 10:31 E-time"]) == pytest.approx(1 / 5)


def test_compute_metrics_by_name():
    out = compute_metrics(["accuracy", "macro_f1"], Y_TRUE, Y_PRED)
    assert out == {"accuracy": 0.5, "macro_f1": pytest.approx(4 / 9)}
    assert METRICS["wer"].higher_is_better is False and METRICS["accuracy"].higher_is_better is True
    with pytest.raises(MetricError, match="unknown metric 'bleu'"):
        compute_metrics(["bleu"], Y_TRUE, Y_PRED)
