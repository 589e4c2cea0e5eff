"""fairseq fine-tuning's span masking: how much is masked, where (never padding), equal counts per row, the mask
embedding, and the encoder hook it goes through."""

from __future__ import annotations

import pytest
import torch

from speechprompt.config import ConfigError
from speechprompt.superb.feature_mask import FeatureMaskConfig, feature_masker, span_mask


def test_span_mask_covers_about_prob_of_the_valid_frames_in_spans():
    torch.manual_seed(0)
    valid = torch.tensor([400, 300, 200])
    mask = span_mask(3, 400, prob=0.5, length=10, min_masks=2, valid=valid)
    assert mask.shape == (3, 400) and mask.dtype == torch.bool
    for b, n in enumerate(valid.tolist()):
        assert not mask[b, n:].any()  # never in padding
    counts = mask.sum(1)
    assert len(set(counts.tolist())) == 1  # fairseq's require_same_masks: every row as many as the smallest
    # Spans overlap, so the 200-frame row covers somewhat less than half of its frames: between 25% and 50%.
    assert 50 <= int(counts[0]) <= 100
    # The full row alone: spans of 10 consecutive frames (runs are multiples of nothing less than 10).
    torch.manual_seed(1)
    row = span_mask(1, 400, prob=0.3, length=10)[0].int()
    edges = torch.diff(torch.cat([torch.zeros(1, dtype=torch.int), row, torch.zeros(1, dtype=torch.int)]))
    starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
    assert ((ends - starts) >= 10).all()


def test_span_mask_min_masks_and_short_rows():
    torch.manual_seed(0)
    counts = span_mask(2, 50, prob=0.0, length=5, min_masks=2).sum(1).tolist()
    assert counts[0] == counts[1] and 6 <= counts[0] <= 10  # two spans of 5 at distinct starts, maybe overlapping
    tiny = span_mask(2, 3, prob=0.9, length=10, valid=torch.tensor([3, 1]))
    assert not tiny[1].any()  # one frame: nothing can be masked, and the other row is thinned to match
    assert not tiny.any()


def test_masker_puts_the_mask_embedding_then_zeroes_channels():
    torch.manual_seed(0)
    x = torch.randn(2, 60, 16)
    frame_mask = torch.arange(60)[None, :] >= torch.tensor([60, 40])[:, None]
    emb = torch.full((16,), 7.0)
    out = feature_masker(FeatureMaskConfig(time_prob=0.4, time_length=5), emb)(x, frame_mask)
    replaced = (out == 7.0).all(-1)  # (B, F)
    untouched = (out == x).all(-1)
    assert (replaced | untouched).all() and replaced.any()
    assert not (replaced & frame_mask).any()
    channels = feature_masker(FeatureMaskConfig(channel_prob=0.3, channel_length=4), None)(x, frame_mask)
    zero_cols = (channels == 0).all(1)  # (B, D)
    assert zero_cols.any(1).all()
    torch.testing.assert_close(channels[~zero_cols[:, None, :].expand_as(x)], x[~zero_cols[:, None, :].expand_as(x)])
    with pytest.raises(ConfigError, match="mask embedding"):
        feature_masker(FeatureMaskConfig(time_prob=0.5), None)
    with pytest.raises(ConfigError, match="time_prob"):
        FeatureMaskConfig(time_prob=1.0)


def test_the_encoder_applies_the_mask_to_its_projected_features():
    from tiny_encoders import our_tiny, waveforms

    model = our_tiny("wav2vec2")
    source, padding = waveforms()
    seen = {}

    def probe(x: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
        seen["shape"], seen["mask"] = tuple(x.shape), frame_mask
        return torch.zeros_like(x)

    with torch.no_grad():
        plain, frame_mask = model.hidden_states(source, padding)
        masked, _ = model.hidden_states(source, padding, feature_mask=probe)
    assert seen["shape"] == tuple(plain[0].shape) and torch.equal(seen["mask"], frame_mask)
    assert not torch.allclose(masked[0], plain[0])  # the layers' input changed ...
    identity, _ = model.hidden_states(source, padding, feature_mask=lambda x, m: x)
    for a, b in zip(identity, plain):  # ... and an identity mask changes nothing
        torch.testing.assert_close(a, b)
