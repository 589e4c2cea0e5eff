import json
import math

import pytest
import torch
import torch.nn.functional as F

from speechprompt.verbalizers import (
    NSPECIAL,
    FixedVerbalizer,
    LearnableVerbalizer,
    VerbalizerConfig,
    VerbalizerError,
    build_verbalizer,
    verbalizer_from_dict,
)

K = 20
V = K + NSPECIAL
LABELS = ["down", "no", "up", "yes"]
TRAIN_LABELS = ["yes", "yes", "no", "up", "down", "yes"]
TRAIN_UNITS = [[4 + u] * (30 - u) for u in range(K)]


def test_shapes():
    torch.manual_seed(0)
    head = LearnableVerbalizer(LABELS, K)
    assert head(torch.randn(3, V)).shape == (3, 4)
    assert head(torch.randn(2, 5, V)).shape == (2, 5, 4)
    assert head.proj.bias is None
    assert sum(p.numel() for p in head.parameters()) == 4 * V


def test_random_init_is_zero_mean_uniform_within_the_linear_bound():
    torch.manual_seed(0)
    weight = LearnableVerbalizer([str(i) for i in range(50)], K).proj.weight
    bound = 1 / math.sqrt(V)
    assert weight.abs().max() <= bound and weight.abs().max() > 0.9 * bound
    assert abs(weight.mean().item()) < 0.05 * bound


def test_init_from_fixed_reproduces_the_fixed_verbalizers_class_scores():
    fixed = FixedVerbalizer.fit_freq(TRAIN_LABELS, TRAIN_UNITS, K)
    head = LearnableVerbalizer(fixed.labels, K, init_from=fixed)
    torch.manual_seed(0)
    logits = torch.randn(8, V) * 3  # (B, V)
    class_logits = head(logits)  # (B, C)
    tokens = fixed.candidates()[:, 0]  # (C,)
    assert torch.equal(class_logits, logits[:, tokens])
    # Constrained scoring of the fixed verbalizer uses log-probabilities; the class softmax is the same.
    fixed_scores = F.log_softmax(logits, dim=-1)[:, tokens]
    torch.testing.assert_close(F.log_softmax(class_logits, -1), F.log_softmax(fixed_scores, -1))
    targets = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    torch.testing.assert_close(F.cross_entropy(class_logits, targets), F.cross_entropy(fixed_scores, targets))
    assert head.predict(logits) == [fixed.labels[i] for i in fixed_scores.argmax(-1).tolist()]


def test_init_from_a_multi_token_verbalizer_is_refused():
    fixed = FixedVerbalizer.fit_random(["a|b", "c|d"], K, slot_separator="|")
    with pytest.raises(VerbalizerError, match="one-token fixed verbalizer; this one has 2"):
        LearnableVerbalizer(fixed.labels, K, init_from=fixed)


def test_training_moves_the_weight_and_lowers_the_loss():
    torch.manual_seed(0)
    head = LearnableVerbalizer(LABELS, K)
    targets = torch.randint(0, 4, (64,))
    logits = torch.randn(64, V)
    logits[torch.arange(64), 7 + targets] += 3.0  # class c lifts token 7 + c
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(head(logits), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_to_dict_and_state_dict_reproduce_the_outputs_exactly():
    torch.manual_seed(0)
    head = LearnableVerbalizer(LABELS, K)
    rebuilt = verbalizer_from_dict(json.loads(json.dumps(head.to_dict())))
    assert isinstance(rebuilt, LearnableVerbalizer) and rebuilt.labels == LABELS
    x = torch.randn(4, V)
    assert torch.count_nonzero(rebuilt(x)) == 0  # untrained until the checkpoint's tensors are loaded
    rebuilt.load_state_dict(head.state_dict())
    assert torch.equal(rebuilt(x), head(x))
    assert list(head.state_dict()) == ["proj.weight"]


def test_label_api():
    head = LearnableVerbalizer(LABELS, K)
    for label in LABELS:
        assert head.labels[head.index(label)] == label  # label -> class -> label is exact
        assert head.encode(label) == []  # no tokens follow <s>
    assert head.target_length == 0
    assert head.candidates().shape == (4, 0)
    with pytest.raises(VerbalizerError, match="label 'left' was not seen"):
        head.encode("left")
    with pytest.raises(VerbalizerError, match="use predict"):
        head.decode([5])


def test_bad_inputs():
    head = LearnableVerbalizer(LABELS, K)
    with pytest.raises(VerbalizerError, match="expected vocabulary logits of size 24"):
        head(torch.zeros(1, V + 1))
    head.check_vocab(V)
    with pytest.raises(VerbalizerError, match="built for 20 units but the model has 100"):
        head.check_vocab(104)
    with pytest.raises(VerbalizerError, match="distinct"):
        LearnableVerbalizer(["a", "a"], K)


@pytest.mark.parametrize("init", ["random", "freq"])
def test_build_from_config(init):
    head = build_verbalizer(VerbalizerConfig(kind="learnable", learnable_init=init), TRAIN_LABELS, TRAIN_UNITS, K)
    assert isinstance(head, LearnableVerbalizer) and head.labels == LABELS
    if init == "freq":
        # "yes" is the most frequent label: its row is the one-hot of the most frequent unit (token 4).
        assert head.proj.weight[head.index("yes")].nonzero().flatten().tolist() == [4]


def test_build_from_a_map_file(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"down": 1, "no": 2, "up": 3, "yes": 4}))
    cfg = VerbalizerConfig(kind="learnable", learnable_init="map", map_path=str(path))
    head = build_verbalizer(cfg, TRAIN_LABELS, TRAIN_UNITS, K)
    assert head.proj.weight[head.index("up")].argmax().item() == 3 + NSPECIAL
