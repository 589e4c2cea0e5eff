"""SUPERB heads one by one: the registry, shapes, what the padding mask hides, losses against hand computations,
decoding and metrics (s3prl's utterance/multislot heads, AST's classifier, the CTC heads and SpecAugment)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from speechprompt import config as C
from speechprompt.config import ConfigError
from speechprompt.superb import (
    HEADS,
    ASTHead,
    BiLSTMCTCHead,
    ClassificationHead,
    EncoderCTCHead,
    Features,
    MultiSlotHead,
    SuperbConfig,
    build_head,
)
from speechprompt.superb.ctc_heads import spec_augment
from speechprompt.superb.head_registry import describe_heads, head_options
from speechprompt.tasks.ctc import CharVocabulary

D = 8


def _batch(lengths: list[int], frames: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random features ``(B, frames, D)`` and a mask that pads each row after its length."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), frames, D, generator=g)
    mask = torch.arange(frames)[None, :] >= torch.tensor(lengths)[:, None]
    return x, mask


def _garbage_in_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(mask[..., None], 1e3)


def test_registry_names_features_and_strict_options():
    assert set(HEADS) == {"classification", "utterance", "multislot", "ast", "ctc", "bilstm_ctc", "encoder_ctc"}
    final = {name for name, spec in HEADS.items() if spec.features is Features.FINAL}
    assert final == {"ast", "encoder_ctc"}
    assert head_options("utterance").projector_dim == 256 and head_options("bilstm_ctc").hidden == [1024, 1024]
    with pytest.raises(ConfigError, match="unknown SUPERB head 'lstm'"):
        head_options("lstm")
    with pytest.raises(ConfigError, match="projector_dims"):
        head_options("utterance", {"projector_dims": 3})
    help_text = describe_heads()
    assert "bilstm_ctc [weighted_sum]" in help_text and "encoder_ctc [final]" in help_text
    # A config names a head and its options; both are checked when the config is read.
    base = {"data": {"train_manifest": "t.tsv"}, "upstream": "u.pt"}
    assert C.from_dict(SuperbConfig, {**base, "head": "multislot", "head_options": {"projector_dim": 4}}).head \
        == "multislot"
    with pytest.raises(ConfigError, match="unknown SUPERB head"):
        C.from_dict(SuperbConfig, {**base, "head": "nope"})
    with pytest.raises(ConfigError, match="dropout"):
        C.from_dict(SuperbConfig, {**base, "head": "bilstm_ctc", "head_options": {"dropout": 1.5}})


def test_utterance_head_projects_frames_then_pools_the_valid_ones():
    torch.manual_seed(0)
    head = build_head("utterance", D, ["b", "a", "c", "a"], {"projector_dim": 5})
    assert isinstance(head, ClassificationHead) and head.labels == ["a", "b", "c"]
    assert sum(p.numel() for p in head.parameters()) == (D * 5 + 5) + (5 * 3 + 3)  # s3prl: projector + linear
    x, mask = _batch([10, 6, 3])
    out = head(x, mask)
    assert out.shape == (3, 3)
    torch.testing.assert_close(head(_garbage_in_padding(x, mask), mask), out)
    expected = head.proj(head.projector(x[1, :6]).mean(0))
    torch.testing.assert_close(out[1], expected)
    # The plain classification head has no projector: its checkpoint keys stay those of the first SUPERB release.
    assert set(build_head("classification", D, ["a", "b"]).state_dict()) == {"proj.weight", "proj.bias"}


def test_classification_loss_ignores_unknown_labels_and_scores_accuracy():
    head = ClassificationHead(D, ["a", "b"])
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    total, terms = head.loss(logits, None, ["a", "a", "zzz"])
    assert terms == 2
    torch.testing.assert_close(total, F.cross_entropy(logits[:2], torch.tensor([0, 0]), reduction="sum"))
    assert head.decode(logits[:2], None) == ["a", "b"]
    assert head.metrics(["a", "a"], ["a", "b"]) == {"accuracy": 0.5}


def test_multislot_head_slices_per_slot_and_needs_every_slot_right():
    torch.manual_seed(0)
    labels = ["on|lights|kitchen", "off|lights|none", "on|music|none"]
    head = build_head("multislot", D, labels, {"projector_dim": 4})
    assert isinstance(head, MultiSlotHead)
    assert head.slots == [["off", "on"], ["lights", "music"], ["kitchen", "none"]]
    x, mask = _batch([10, 4])
    out = head(x, mask)
    assert out.shape == (2, 6)
    torch.testing.assert_close(head(_garbage_in_padding(x, mask), mask), out)
    total, terms = head.loss(out, mask, ["on|music|none", "off|lights|bedroom"])  # 'bedroom' was never trained on
    expected = (F.cross_entropy(out[:, 0:2], torch.tensor([1, 0]), reduction="sum")
                + F.cross_entropy(out[:, 2:4], torch.tensor([1, 0]), reduction="sum")
                + F.cross_entropy(out[:1, 4:6], torch.tensor([1]), reduction="sum"))
    assert terms == 2
    torch.testing.assert_close(total, expected)
    logits = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.0, 1.0]])
    assert head.decode(logits, mask[:1]) == ["on|lights|none"]
    refs, hyps = ["on|lights|none", "off|music|none"], ["on|lights|none", "off|lights|none"]
    assert head.metrics(refs, hyps) == {"accuracy": 0.5, "slot_accuracy": pytest.approx(5 / 6)}
    with pytest.raises(ConfigError, match="same number"):
        build_head("multislot", D, ["a|b|c", "a|b"])
    with pytest.raises(ConfigError, match="has 2 slots"):
        head.loss(out[:1], mask[:1], ["on|lights"])
    rebuilt = MultiSlotHead.from_meta(D, head.describe(), head_options("multislot", {"projector_dim": 4}))
    assert rebuilt.slots == head.slots


def test_ast_head_reads_only_the_class_and_distillation_tokens():
    torch.manual_seed(0)
    head = build_head("ast", D, ["dog", "cat"])
    assert isinstance(head, ASTHead) and head.labels == ["cat", "dog"]
    x, mask = _batch([10, 10])
    out = head(x, mask)
    changed = x.clone()
    changed[:, 2:] = -7.0
    torch.testing.assert_close(head(changed, mask), out)
    torch.testing.assert_close(out, head.proj(head.layernorm((x[:, 0] + x[:, 1]) / 2)))


def test_spec_augment_masks_stay_inside_valid_frames():
    torch.manual_seed(0)
    x = torch.ones(3, 40, 16)
    mask = torch.arange(40)[None, :] >= torch.tensor([40, 25, 6])[:, None]
    out = spec_augment(x, mask, time_masks=2, time_width=5, freq_masks=1, freq_width=4)
    zeroed = out == 0  # (B, F, D)
    full_frames = zeroed.all(-1)  # frames wiped by a time mask
    assert not (full_frames & mask).any()  # never in padding
    assert (full_frames.sum(1) <= 10).all()  # two masks of at most 5 frames
    bands = zeroed.all(1)  # dimensions wiped by a frequency mask, (B, D)
    assert (bands.sum(1) <= 4).all()
    assert zeroed.any()  # something was masked
    # Deterministic under the global seed, as a resumed run needs.
    torch.manual_seed(0)
    torch.testing.assert_close(spec_augment(x, mask, 2, 5, 1, 4), out)


def _bilstm(time_masks: int = 0) -> BiLSTMCTCHead:
    torch.manual_seed(0)
    opts = {"project_dim": 6, "hidden": [5, 4], "dropout": 0.0, "time_masks": time_masks, "freq_masks": 0}
    return build_head("bilstm_ctc", D, ["ab a", "b"], opts)


def test_bilstm_ctc_head_shapes_and_padding_never_reaches_a_valid_frame():
    head = _bilstm().eval()
    assert head.vocab.symbols == ["a", "b", "|"]
    assert [rnn.hidden_size for rnn in head.rnns] == [5, 4] and all(rnn.bidirectional for rnn in head.rnns)
    assert head.proj.in_features == 8  # 2 x 4 of the last BiLSTM
    x, mask = _batch([10, 7, 3])
    out = head(x, mask)
    assert out.shape == (3, 10, len(head.vocab))
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(3, 10))
    again = head(_garbage_in_padding(x, mask), mask)
    valid = ~mask
    torch.testing.assert_close(again[valid], out[valid])
    # A row alone gives what it gives in the batch (packed sequences, both directions).
    torch.testing.assert_close(head(x[2:, :3], mask[2:, :3])[0], out[2, :3])
    total, terms = head.loss(out, mask, ["ab", "a", "b"])
    assert terms == 3 and torch.isfinite(total)


def test_bilstm_ctc_head_augments_only_while_training():
    head = _bilstm(time_masks=2)
    x, mask = _batch([10, 10], seed=3)
    head.eval()
    torch.testing.assert_close(head(x, mask), head(x, mask))
    head.train()
    torch.manual_seed(1)
    a = head(x, mask)
    torch.manual_seed(2)
    b = head(x, mask)
    assert not torch.equal(a, b)  # another draw of the masks


def test_fixed_characters_cover_what_a_small_training_set_lacks():
    head = build_head("encoder_ctc", D, ["AB"], {"characters": "ABCZ' "})
    assert head.vocab.symbols == ["'", "A", "B", "C", "Z", "|"]
    assert head.vocab.decode(head.vocab.encode("ZA C")) == "ZA C"
    assert build_head("ctc", D, ["ba"]).vocab.symbols == ["a", "b"]


def test_encoder_ctc_loss_is_summed_per_utterance_not_per_character():
    torch.manual_seed(0)
    head = build_head("encoder_ctc", D, ["ab", "b"])
    assert isinstance(head, EncoderCTCHead)
    x, mask = _batch([10, 6])
    out = head(x, mask)
    total, terms = head.loss(out, mask, ["ab", "b"])
    assert terms == 2
    per_utterance = F.ctc_loss(out.transpose(0, 1), torch.tensor([1, 2, 2]), torch.tensor([10, 6]),
                               torch.tensor([2, 1]), blank=0, reduction="none")
    torch.testing.assert_close(total, per_utterance.sum())  # fairseq's sentence_avg: no division by length
    ctc = build_head("ctc", D, ["ab", "b"])
    with torch.no_grad():
        ctc.proj.load_state_dict(head.proj.state_dict())
    torch.testing.assert_close(ctc.loss(out, mask, ["ab", "b"])[0], (per_utterance / torch.tensor([2, 1])).sum())


def test_ctc_heads_decode_greedily_and_score_wer():
    vocab = CharVocabulary.from_texts(["ab"])
    head = EncoderCTCHead(3, vocab)
    with torch.no_grad():
        head.proj.weight.copy_(torch.eye(3) * 20)
        head.proj.bias.zero_()
    feats = F.one_hot(torch.tensor([[1, 1, 0, 2, 2, 1]]), 3).float()  # a a _ b b | a (last frame is padding)
    mask = torch.tensor([[False] * 5 + [True]])
    assert head.decode(head(feats, mask), mask) == ["ab"]
    assert head.metrics(["ab", "a  b"], ["ab", "a b"]) == {"wer": 0.0, "cer": 0.0}
