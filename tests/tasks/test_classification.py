"""Classification heads: constrained scoring against brute force, greedy decoding, multi-slot, learnable verbalizer,
unseen labels, and the LM data layout they rely on."""

from __future__ import annotations

import pytest
import torch

from speechprompt.models.generation import greedy, sequence_logprob
from speechprompt.models.unit_lm import UnitLM, UnitLMConfig
from speechprompt.tasks.classification import (
    LearnableClassifier,
    VerbalizedClassifier,
    classification_metrics,
    confusion,
)
from speechprompt.tasks.data import IGNORE, Split, batches, collate, mean_loss
from speechprompt.tuning import build_method, freeze_except, method_config
from speechprompt.verbalizers import BOS, EOS, PAD, UNKNOWN_LABEL, FixedVerbalizer, LearnableVerbalizer

K = 12

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def lm():
    torch.manual_seed(0)
    model = UnitLM(UnitLMConfig.named("tiny", vocab_size=K + 4, max_positions=64)).eval()
    method = build_method(method_config("prompt", {"length": 3}), model)
    freeze_except(model, method)
    with torch.no_grad():  # a prompt that is not at its init, so that it matters in every check
        for p in method.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model, method


SOURCES = [[4, 5, 6, 7, 8], [9, 10], [11, 4, 4]]


def test_collate_layout():
    v = FixedVerbalizer({"a": [0, 1], "b": [2, 3]}, K)
    b = collate(SOURCES[:2], ["b", "zzz"], v)
    assert b.tokens[0].tolist() == [4, 5, 6, 7, 8, BOS, 6, 7]
    assert b.targets[0].tolist() == [IGNORE] * 5 + [6, 7, EOS]
    # An unseen label has no target at all and class id -1; it still gets a prefix to predict from.
    assert b.targets[1].tolist() == [IGNORE] * 8 and b.class_ids.tolist() == [1, -1]
    assert b.prefix.tolist() == [[4, 5, 6, 7, 8, BOS], [PAD, PAD, PAD, 9, 10, BOS]]  # left-padded


def test_shuffled_batches_group_lengths_and_cover_every_utterance_once():
    lengths = [int(n) for n in torch.randint(2, 80, (203,), generator=torch.Generator().manual_seed(0))]
    split = Split(tokens=[[4] * n for n in lengths], labels=["a"] * len(lengths), rows=list(range(len(lengths))))
    v = FixedVerbalizer({"a": [0]}, K)

    def epoch(seed: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(seed)
        return [b.index.tolist() for b in batches(split, v, 16, shuffle=True, generator=generator)]

    first = epoch(1)
    assert sorted(i for idx in first for i in idx) == list(range(len(lengths)))
    assert first == epoch(1) and first != epoch(2)  # reproducible from the generator, new order per epoch
    real = sum(lengths)
    padded = sum(max(lengths[i] for i in idx) * len(idx) for idx in first)
    assert padded / real < 1.1  # random batches of these lengths pad ~1.5x
    sizes = [len(idx) for idx in first]
    assert sorted(sizes) == [11] + [16] * 12


def test_constrained_scores_equal_brute_force_sequence_logprob(lm):
    model, method = lm
    v = FixedVerbalizer({"a": [0, 1], "b": [2, 3], "c": [1, 0], "d": [5, 5]}, K)
    task = VerbalizedClassifier(model, method, v)
    batch = collate(SOURCES, ["a", "b", "c"], v)
    with torch.no_grad():
        scores = task.candidate_scores(batch.prefix)  # (B, C)
        for i, src in enumerate(SOURCES):
            for c, label in enumerate(v.labels):
                tokens = torch.tensor([src + [BOS] + v.encode(label)])
                mask = torch.zeros_like(tokens, dtype=torch.bool)
                mask[0, len(src) + 1:] = True
                ref = sequence_logprob(model, tokens, mask, model_kwargs=method.forward_kwargs(1))
                torch.testing.assert_close(scores[i, c], ref[0], atol=1e-5, rtol=1e-5)


def test_greedy_prediction_is_the_argmax_path(lm):
    model, method = lm
    v = FixedVerbalizer({f"l{u}": [u] for u in range(K)}, K)  # every unit is a label: free decoding never fails
    task = VerbalizedClassifier(model, method, v)
    batch = collate(SOURCES, ["l0"] * 3, v)
    preds = task.predict(batch)
    with torch.no_grad():
        for i, src in enumerate(SOURCES):
            logits = model(torch.tensor([src + [BOS]]), **method.forward_kwargs(1))[0, -1]
            best = int(logits.argmax())
            assert preds["greedy"][i] == (f"l{best - 4}" if best >= 4 else UNKNOWN_LABEL)
            # Constrained scoring only looks at the label tokens.
            assert preds["constrained"][i] == f"l{int(logits[4:].argmax())}"


def test_multislot_accuracy_needs_every_slot():
    refs = ["on|lights|kitchen", "off|music|none", "on|lights|none"]
    hyps = ["on|lights|kitchen", "off|lights|none", UNKNOWN_LABEL]
    m = classification_metrics(refs, {"greedy": hyps}, sorted(set(refs)), slot_separator="|")
    assert m["greedy.accuracy"] == pytest.approx(1 / 3)
    assert m["greedy.slot0_accuracy"] == pytest.approx(2 / 3)
    assert m["greedy.slot1_accuracy"] == pytest.approx(1 / 3)
    assert m["greedy.slot2_accuracy"] == pytest.approx(2 / 3)


def test_multislot_verbalizer_trains_three_tokens():

    torch.manual_seed(0)
    model = UnitLM(UnitLMConfig.named("tiny", vocab_size=K + 4, max_positions=64))
    method = build_method("full_finetune", model)
    freeze_except(model, method)
    labels = ["on|lights|kitchen", "off|music|none", "on|music|none"]
    train_tokens = [[4 + u for u in range(K)]]
    v = FixedVerbalizer.fit_freq(labels, train_tokens, K, slot_separator="|")
    assert v.target_length == 3
    task = VerbalizedClassifier(model, method, v)
    batch = collate(SOURCES, labels, v)
    assert (batch.targets != IGNORE).sum(1).tolist() == [4, 4, 4]  # three slot tokens and </s>
    params = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    total, terms = task.loss(batch)
    assert terms == 12  # the loss is a sum over every target token, and says how many there are
    first = total.item() / terms
    for _ in range(40):
        loss = mean_loss(task.loss(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert mean_loss(task.loss(batch)).item() < first / 4
    model.eval()
    preds = task.predict(batch)
    assert preds["constrained"] == labels == preds["greedy"]
    m = task.metrics(labels, preds)
    assert m["constrained.accuracy"] == m["greedy.accuracy"] == m["greedy.slot2_accuracy"] == 1.0


def test_learnable_verbalizer_reads_the_separator_position(lm):
    model, method = lm
    v = LearnableVerbalizer(["x", "y"], K)
    task = LearnableClassifier(model, method, v)
    batch = collate(SOURCES, ["x", "y", "x"], v)
    logits = task.class_logits(batch)
    with torch.no_grad():
        for i, src in enumerate(SOURCES):
            vocab = model(torch.tensor([src + [BOS]]), **method.forward_kwargs(1))[0, -1]
            torch.testing.assert_close(logits[i], v(vocab), atol=1e-5, rtol=1e-5)
    # Unknown labels are left out of the loss instead of crashing it.
    unknown = collate(SOURCES, ["x", "nope", "y"], v)
    total, terms = task.loss(unknown)
    assert unknown.class_ids.tolist() == [0, -1, 1] and torch.isfinite(total) and terms == 2


def test_predict_with_loss_equals_separate_passes(lm):
    """The evaluator's one-pass path gives the predictions of free greedy decoding and constrained scoring, and the
    teacher-forced loss, each as computed on its own (two-token labels, and one unseen label left out of the loss)."""
    model, method = lm
    v = FixedVerbalizer({"a": [0, 1], "b": [2, 3], "c": [1, 0], "d": [5, 5]}, K)
    task = VerbalizedClassifier(model, method, v)
    batch = collate(SOURCES, ["a", "nope", "c"], v)
    preds, loss = task.predict_with_loss(batch)
    with torch.no_grad():
        torch.testing.assert_close(loss, mean_loss(task.loss(batch)), atol=1e-5, rtol=1e-5)
        ids = greedy(model, batch.prefix, v.target_length, EOS, model_kwargs=method.forward_kwargs(3))
        scores = task.candidate_scores(batch.prefix)
    assert preds["greedy"] == [v.decode(row) for row in ids.tolist()]
    assert preds["constrained"] == [v.labels[i] for i in scores.argmax(dim=1).tolist()]

    learnable = LearnableClassifier(model, method, LearnableVerbalizer(["a", "c"], K))
    batch = collate(SOURCES, ["a", "nope", "c"], learnable.verbalizer)
    preds, loss = learnable.predict_with_loss(batch)
    with torch.no_grad():
        torch.testing.assert_close(loss, mean_loss(learnable.loss(batch)))
        assert preds == learnable.predict(batch)


def test_confusion_counts_undecodable_predictions():
    matrix, names = confusion(["a", "b", "b"], ["a", UNKNOWN_LABEL, "b"], ["a", "b"])
    assert names == ["a", "b", UNKNOWN_LABEL]
    assert matrix.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 0]]
