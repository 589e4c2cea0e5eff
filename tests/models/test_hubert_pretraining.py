"""HuBERT's masked prediction (speechprompt.models.hubert_pretraining) and the fbank front end.

* masks: equal to fairseq's ``compute_mask_indices`` draw for draw given the same per-row generators (the fairseq
  oracle), and, on their own, the statistics the algorithm implies (the masked fraction of spans placed without
  replacement, equal counts per row, spans of ``mask_length``, ``min_masks``, a row too short to mask);
* the forward and loss against a hand computation written as fairseq writes it (positive first, every embedding as a
  negative, the duplicate at ``-inf``), with two label sets, an untied projection and ``target_glu``;
* the fbank front end's frame counts, and the fairseq config written for each front end.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracle import run_oracle
from tiny_encoders import randomize

from speechprompt.audio import fbank
from speechprompt.models.hubert import HubertConfig, HubertModel
from speechprompt.models.hubert_pretraining import (
    MaskingError,
    compute_mask_indices,
    fairseq_hubert_cfg,
    is_fairseq_architecture,
    masked_prediction,
    min_maskable_frames,
    pretraining_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CONV_50HZ = "[(16,10,5)] + [(16,3,2)] * 4 + [(16,2,2)] * 2"  # HuBERT's strides: 320 samples per frame


def _rngs(seeds: list[int]) -> list[np.random.Generator]:
    return [np.random.default_rng(s) for s in seeds]


# ---------------------------------------------------------------------------------------------------------------
# Masks


MASK_SPECS = [  # shape, mask_prob, mask_length, seed, epoch, row indices
    ([4, 60], 0.8, 10, 3, 1, [5, 6, 7, 8]),
    ([3, 200], 0.8, 10, 11, 2, [0, 1, 2]),
    ([5, 37], 0.65, 5, 7, 4, [10, 20, 30, 40, 50]),
    ([2, 25], 0.3, 10, 1, 1, [3, 4]),  # min_masks=2 decides the span count
]


@pytest.mark.fairseq
def test_masks_equal_fairseqs_draw_for_draw(tmp_path):
    specs = [{"shape": s, "mask_prob": p, "mask_length": n, "seed": seed, "epoch": e, "indices": idx}
             for s, p, n, seed, e, idx in MASK_SPECS]
    out = run_oracle("fairseq", "hubert_pretraining", tmp_path, masks=specs)
    theirs = torch.load(out / "ref.pt", weights_only=True)["masks"]
    for (shape, p, n, seed, epoch, idx), expected in zip(MASK_SPECS, theirs):
        # fairseq seeds row i with hash((seed, epoch, index_i)) % 1e6 (ints hash the same in every process).
        rngs = _rngs([int(hash((seed, epoch, i)) % 1e6) for i in idx])
        ours = compute_mask_indices(tuple(shape), None, p, n, 2, rngs)
        assert expected.any() and np.array_equal(ours, expected.numpy()), (shape, p, n)


def _expected_masked_fraction(frames: int, mask_prob: float, length: int) -> float:
    """Before equalisation: ``n`` distinct starts among ``frames - length``; frame ``t`` is masked unless no start
    falls in the (up to) ``length`` positions before it: hypergeometric, averaged over ``t``."""
    n = int(mask_prob * frames / length)  # the rounding adds 0 or 1 span: averaged below
    total = 0.0
    for spans, weight in ((n, 1 - (mask_prob * frames / length - n)), (n + 1, mask_prob * frames / length - n)):
        starts = frames - length
        for t in range(frames):
            covering = min(t, starts - 1) - max(0, t - length + 1) + 1  # starts that would cover t
            free = math.comb(starts - covering, spans) / math.comb(starts, spans)
            total += weight * (1 - free)
    return total / frames


def test_masked_fraction_counts_and_spans_follow_the_algorithm():
    frames, rows = 400, 200
    unequal = compute_mask_indices((rows, frames), None, 0.8, 10, 2, _rngs(list(range(rows))),
                                   require_same_masks=False)
    assert unequal.mean() == pytest.approx(_expected_masked_fraction(frames, 0.8, 10), abs=0.01)  # ~0.55
    for row in unequal:  # overlapping spans merge: every run of masked frames is at least one span long
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(int), [0]])))
        assert all(end - start >= 10 for start, end in zip(edges[::2], edges[1::2]))
    equal = compute_mask_indices((rows, frames), None, 0.8, 10, 2, _rngs(list(range(rows))))
    counts = equal.sum(axis=1)
    assert (counts == unequal.sum(axis=1).min()).all()  # every row cut down to the smallest count
    assert (equal <= unequal).all()  # cutting only unmasks


def test_padding_min_masks_and_rows_too_short_to_mask():
    pad = np.zeros((2, 100), dtype=bool)
    pad[1, 60:] = True
    mask = compute_mask_indices((2, 100), pad, 0.8, 10, 2, _rngs([0, 1]), require_same_masks=False)
    assert not (mask & pad).any() and mask[1, :60].any()
    few = compute_mask_indices((50, 100), None, 0.01, 10, 2, _rngs(list(range(50))), require_same_masks=False)
    assert (few.sum(axis=1) >= 10).all()  # two spans at least, even at a tiny mask_prob
    with pytest.raises(MaskingError, match="masked entirely"):
        for seed in range(20):  # 2 spans of 10 in 5 frames: fairseq fails here too
            compute_mask_indices((1, 5), None, 0.8, 10, 2, _rngs([seed]))
    need = min_maskable_frames(0.8, 10)
    assert need == 50
    compute_mask_indices((2000, need), None, 0.8, 10, 2, _rngs(list(range(2000))))  # never all masked


# ---------------------------------------------------------------------------------------------------------------
# Forward and loss


def _tiny(num_classes: list[int], **overrides: object) -> HubertModel:
    cfg = HubertConfig(conv_feature_layers=CONV_50HZ, encoder_layers=2, encoder_embed_dim=32,
                       encoder_ffn_embed_dim=64, encoder_attention_heads=4, conv_pos=8, conv_pos_groups=4, final_dim=8,
                       dropout=0.0, attention_dropout=0.0, **overrides)
    torch.manual_seed(0)
    model = HubertModel(cfg, num_classes)
    randomize(model, 1)
    return model.eval()


def _fairseq_style_loss(model: HubertModel, source, targets, mask, temp, w_m, w_u, w_pen):
    """fairseq's HubertModel.forward + hubert criterion, spelled out (positive first, all embeddings as negatives)."""
    features = model.feature_extractor(source)[..., : mask.shape[1]]  # (B, C, F)
    pen = features.pow(2).mean()
    x = model.post_extract_proj(model.layer_norm(features.transpose(1, 2)))
    x = x.clone()
    x[mask] = model.mask_emb
    x = model.encoder.layer_norm(model.encoder.pos_conv(x.transpose(1, 2)).transpose(1, 2) + x)
    for layer in model.encoder.layers:
        x = layer(x)
    embs = model.label_embs_concat.split(model.num_classes)
    loss, sample_size = 0.0, 0
    for selected, weight in ((mask, w_m), (~mask, w_u)):
        proj = model.final_proj(x[selected]).chunk(len(targets), dim=-1)
        for k, target in enumerate(targets):
            emb = model.target_glu(embs[k])
            y = emb[target[selected]]  # (S, d) the positives
            negs = emb[:, None, :].expand(-1, len(y), -1)  # (C, S, d) every embedding
            logits = torch.cosine_similarity(proj[k], torch.cat([y[None], negs]), dim=-1) / temp  # (1 + C, S)
            logits[1:][(y[None] == negs).all(-1)] = float("-inf")
            logits = logits.T  # (S, 1 + C)
            if weight:
                loss = loss + weight * F.cross_entropy(logits, torch.zeros(len(y), dtype=torch.long), reduction="sum")
        sample_size += int(selected.sum()) if weight else 0
    return loss + w_pen * pen * sample_size, sample_size


def test_loss_equals_a_hand_computation_with_two_label_sets_untied_and_glu():
    model = _tiny([9, 6], untie_final_proj=True, target_glu=True)
    g = torch.Generator().manual_seed(0)
    source = torch.randn(2, 16000, generator=g)  # 49 frames
    frames = 45  # fewer than the front end gives: the labels end first
    targets = [torch.randint(4, 9, (2, frames), generator=g), torch.randint(4, 6, (2, frames), generator=g)]
    mask = torch.from_numpy(compute_mask_indices((2, frames), None, 0.8, 5, 2, _rngs([0, 1])))
    with torch.no_grad():
        out = masked_prediction(model, source, targets, mask, logit_temp=0.1)
        loss, sample_size, stats = pretraining_loss(out, pred_masked_weight=1.0, pred_nomask_weight=0.5,
                                                    features_pen_weight=10.0)
        expected, expected_size = _fairseq_style_loss(model, source, targets, mask, 0.1, 1.0, 0.5, 10.0)
    assert sample_size == expected_size == 2 * frames
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert [lg.shape for lg in out.logits_masked] == [(int(mask.sum()), 9), (int(mask.sum()), 6)]
    assert stats["count_m"] == mask.sum() and stats["count_u"] == (~mask).sum()
    assert stats["correct_m"] == (out.logits_masked[0].argmax(-1) == out.targets_masked[0]).sum()


def test_a_masked_frame_input_is_replaced_and_the_weights_choose_the_loss_terms():
    # LayerNorm after every conv: no statistic over time, so samples 2640..3519 reach front-end frames 8-10 only
    # (frame t reads samples 320 t .. 320 t + 399).
    model = _tiny([8], extractor_mode="layer_norm")
    source = torch.randn(1, 8000)
    targets = [torch.randint(4, 8, (1, 20))]
    noisy = source.clone()
    noisy[0, 2640:3520] += 3.0
    mask = torch.zeros(1, 20, dtype=torch.bool)
    mask[0, 6:13] = True  # frames 8-10 inside
    with torch.no_grad():
        assert not torch.equal(model.frontend_features(source)[0, 8:11], model.frontend_features(noisy)[0, 8:11])
        a, b = (masked_prediction(model, x, targets, mask) for x in (source, noisy))
        assert torch.equal(a.logits_masked[0], b.logits_masked[0]) and torch.equal(a.logits_unmasked[0],
                                                                                     b.logits_unmasked[0])
        unmasked = torch.zeros_like(mask)
        unmasked[0, 0:2] = True
        c, d = (masked_prediction(model, x, targets, unmasked) for x in (source, noisy))
        assert not torch.equal(c.logits_unmasked[0], d.logits_unmasked[0])  # the same noise, seen
    masked_only, n_m, _ = pretraining_loss(a, 1.0, 0.0, 0.0)
    both, n_all, stats = pretraining_loss(a, 1.0, 1.0, 0.0)
    assert n_m == 7 and n_all == 20
    assert float(masked_only) == pytest.approx(stats["loss_m"])
    assert float(both) == pytest.approx(stats["loss_m"] + stats["loss_u"])


def test_layerdrop_skips_layers_in_training_only():
    model = _tiny([8])
    torch.manual_seed(0)
    x = torch.randn(2, 10, 32)
    model.encoder.eval()
    full = model.encoder(x, layerdrop=0.999)
    assert not torch.equal(full[-1], full[0])  # eval: every layer runs
    model.encoder.train()
    dropped = model.encoder(x, layerdrop=0.999)
    assert all(torch.equal(h, dropped[0]) for h in dropped[1:])  # training: (almost surely) every layer skipped


# ---------------------------------------------------------------------------------------------------------------
# The fbank front end and the checkpoint config


def test_fbank_front_end_frames_are_stacked_log_mels():
    cfg = HubertConfig(frontend="fbank", fbank_mels=40, fbank_stack=2, encoder_layers=1, encoder_embed_dim=32,
                       encoder_ffn_embed_dim=64, encoder_attention_heads=4, conv_pos=8, conv_pos_groups=4)
    model = HubertModel(cfg, [8]).eval()
    assert model.downsample == 320 and model.receptive_field == 560 and model.frame_rate == 50.0
    wav = torch.randn(2, 16000)
    feats = model.frontend_features(wav)  # (B, F, 80)
    ten_ms = fbank(wav[1], n_mels=40)  # (99, 40)
    assert feats.shape == (2, 49, 80) and model.num_frames(16000) == 49
    torch.testing.assert_close(feats[1, 3], torch.cat([ten_ms[6], ten_ms[7]]))
    assert model.num_frames(559) == 0
    for n in (560, 879, 880, 1200, 16321):  # the geometry's frame count is what the front end gives
        assert model.frontend_features(torch.randn(1, n)).shape[1] == model.num_frames(n)
    with torch.no_grad():
        assert model.extract_features(wav, output_layer=1).shape == (2, 49, 32)
    assert not any(p.requires_grad for p in model.feature_extractor.parameters())  # it has none


def test_fairseq_config_of_each_front_end():
    conv = HubertConfig.base()
    cfg = fairseq_hubert_cfg(conv, 100.0, {"mask_prob": 0.8})
    assert is_fairseq_architecture(conv) and cfg["_name"] == "hubert" and cfg["label_rate"] == 100.0
    assert cfg["extractor_mode"] == "default" and cfg["final_dim"] == 256 and cfg["mask_prob"] == 0.8
    assert "frontend" not in cfg and "frame_padding" not in cfg and "layer_norm_eps" not in cfg  # fairseq lacks them
    light = HubertConfig(frontend="fbank")
    cfg = fairseq_hubert_cfg(light, 50.0, {})
    assert not is_fairseq_architecture(light) and cfg["frontend"] == "fbank"
    assert HubertConfig.from_fairseq(cfg) == light  # our loader reads back the same architecture
