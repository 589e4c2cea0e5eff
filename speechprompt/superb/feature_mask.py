"""Fine-tuning's input masking (fairseq ``apply_mask``): spans of frames replaced by the encoder's mask embedding,
spans of channels zeroed, on the projected features before the transformer.

fairseq fine-tunes wav2vec 2.0 / HuBERT with the same span masking as pretraining (``mask_prob`` 0.65, spans of 10
frames) plus channel masking (``mask_channel_prob`` 0.25-0.5, spans of 64 channels): a SpecAugment in the
encoder's own feature space. :func:`span_mask` draws the spans as fairseq's ``compute_mask_indices`` does in
fine-tuning (static lengths, overlaps allowed, at least ``min_masks`` spans, every row of a batch left with the same
number of masked positions), from torch's global RNG so that a seeded or resumed run draws the same masks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from speechprompt.config import ConfigError, option


@dataclasses.dataclass
class FeatureMaskConfig:
    """Masking of the encoder's projected features while training (fairseq ``apply_mask``; off by default)."""

    time_prob: float = option(0.0, help="fraction of each utterance's frames to mask, as spans (fairseq mask_prob: "
                              "0.65 for wav2vec 2.0 fine-tuning; 0: off)")
    time_length: int = option(10, help="frames per time span (fairseq mask_length)")
    channel_prob: float = option(0.0, help="fraction of the channels to zero, as spans (fairseq mask_channel_prob: "
                                 "0.25 for 10 min / 1 h, 0.5 for 10 h; 0: off)")
    channel_length: int = option(64, help="channels per span (fairseq mask_channel_length)")
    min_masks: int = option(2, help="time spans per utterance at least (fairseq: 2)")

    def __post_init__(self) -> None:
        if not (0 <= self.time_prob < 1 and 0 <= self.channel_prob < 1):
            raise ConfigError("feature_mask.time_prob and channel_prob must be in [0, 1)")
        if self.time_length < 1 or self.channel_length < 1 or self.min_masks < 0:
            raise ConfigError("feature_mask.time_length and channel_length must be >= 1, min_masks >= 0")

    @property
    def enabled(self) -> bool:
        return self.time_prob > 0 or self.channel_prob > 0


def span_mask(batch: int, size: int, prob: float, length: int, min_masks: int = 0,
              valid: Tensor | None = None) -> Tensor:
    """Random spans over ``size`` positions per row, about ``prob`` of the valid ones.

    Per row with ``n`` valid positions: ``int(prob * n / length + u)`` spans (``u`` uniform in [0, 1): rounding at
    random), at least ``min_masks``, of ``length`` positions each, starting at distinct positions in
    ``[0, n - length]`` (overlaps allowed). Rows are then thinned at random to the smallest row's count of masked
    positions, as fairseq's ``require_same_masks``.

    Args:
        batch: rows ``B``.
        size: positions per row ``T``.
        prob: the fraction of valid positions to cover.
        length: positions per span.
        min_masks: spans per row at least.
        valid: ``(B,)`` valid positions per row (the rest is padding); default: all ``size``.

    Returns:
        ``(B, T)`` bool, True at masked positions (never in padding).
    """
    lengths = valid.tolist() if valid is not None else [size] * batch
    rows: list[Tensor] = []
    for n in lengths:
        n = int(n)
        count = max(min_masks, int(prob * n / length + float(torch.rand(()))))
        span = min(length, n - 1)
        if span < 1 or count < 1:
            rows.append(torch.zeros(0, dtype=torch.long))
            continue
        room = n - span
        count = min(count, room)  # distinct starts only
        starts = torch.randperm(room)[:count]  # (count,)
        idx = (starts[:, None] + torch.arange(span)[None, :]).flatten().unique()  # sorted, within [0, n)
        rows.append(idx)
    mask = torch.zeros(batch, size, dtype=torch.bool)
    smallest = min(len(r) for r in rows) if rows else 0
    for b, idx in enumerate(rows):
        if len(idx) > smallest:
            idx = idx[torch.randperm(len(idx))[:smallest]]
        mask[b, idx] = True
    return mask


def feature_masker(cfg: FeatureMaskConfig, mask_emb: Tensor | None) -> Callable[[Tensor, Tensor | None], Tensor]:
    """The function the encoder applies to its projected features ``(B, F, D)`` and frame padding mask ``(B, F)``
    (True at padding) while training: time spans become ``mask_emb``, then channel spans become zero.

    Raises:
        ConfigError: time masking of an encoder without a mask embedding.
    """
    if cfg.time_prob > 0 and mask_emb is None:
        raise ConfigError("feature_mask.time_prob > 0 needs the encoder's mask embedding (mask_emb), which this "
                          "checkpoint does not have; set feature_mask.time_prob=0")

    def apply(x: Tensor, frame_mask: Tensor | None) -> Tensor:
        B, frames, D = x.shape
        if cfg.time_prob > 0:
            valid = (~frame_mask).sum(1).cpu() if frame_mask is not None else None
            where = span_mask(B, frames, cfg.time_prob, cfg.time_length, cfg.min_masks, valid).to(x.device)
            x = torch.where(where[..., None], mask_emb.to(x.dtype), x)  # (B, F, D)
        if cfg.channel_prob > 0:
            channels = span_mask(B, D, cfg.channel_prob, cfg.channel_length).to(x.device)  # (B, D)
            x = x.masked_fill(channels[:, None, :], 0.0)
        return x

    return apply
