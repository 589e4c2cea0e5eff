"""fairseq's token positions for the unit LM: positions that count real tokens only (padding keeps the padding
index), and the sinusoidal and learned tables fairseq builds over them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def make_positions(tokens: Tensor, padding_idx: int, offset: Tensor | None = None) -> Tensor:
    """fairseq's ``utils.make_positions``: non-pad tokens are numbered ``padding_idx + 1, ...`` in order, pads get
    ``padding_idx``. ``offset`` (B,) continues the count after tokens already seen (incremental decoding).

    Args:
        tokens: ``(B, T)`` token ids, left- or right-padded.
    Returns:
        ``(B, T)`` long positions.
    """
    mask = tokens.ne(padding_idx).long()
    count = torch.cumsum(mask, dim=1)
    if offset is not None:
        count = count + offset[:, None]
    return count * mask + padding_idx


class SinusoidalPositions(nn.Module):
    """fairseq's ``SinusoidalPositionalEmbedding`` computed on the fly (no state): ``[sin | cos]`` halves, and
    position ``padding_idx`` maps to zeros."""

    def __init__(self, embed_dim: int, padding_idx: int) -> None:
        super().__init__()
        self.embed_dim, self.padding_idx = embed_dim, padding_idx

    def forward(self, positions: Tensor) -> Tensor:
        """``(B, T)`` long positions -> ``(B, T, D)`` float32 embeddings."""
        half = self.embed_dim // 2
        # Same operation order as fairseq's get_embedding, so that values match bit for bit.
        freq = torch.exp(torch.arange(half, dtype=torch.float, device=positions.device)
                         * -(math.log(10000) / (half - 1)))
        angles = positions.float()[..., None] * freq  # (B, T, D/2)
        emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
        if self.embed_dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb.masked_fill(positions.eq(self.padding_idx)[..., None], 0.0)


class LearnedPositions(nn.Module):
    """fairseq's ``LearnedPositionalEmbedding``: a table of ``max_positions + padding_idx + 1`` rows, because positions
    start at ``padding_idx + 1``; row ``padding_idx`` (pads) stays zero."""

    def __init__(self, max_positions: int, embed_dim: int, padding_idx: int) -> None:
        super().__init__()
        self.padding_idx = padding_idx
        self.weight = nn.Parameter(torch.empty(max_positions + padding_idx + 1, embed_dim))
        nn.init.normal_(self.weight, mean=0.0, std=embed_dim**-0.5)
        with torch.no_grad():
            self.weight[padding_idx].zero_()

    def forward(self, positions: Tensor) -> Tensor:
        """``(B, T)`` long positions -> ``(B, T, D)``."""
        if positions.numel() and int(positions.max()) >= self.weight.shape[0]:
            raise ValueError(
                f"sequence of {int(positions.max()) - self.padding_idx} tokens is longer than the "
                f"{self.weight.shape[0] - self.padding_idx - 1} learned positions"
            )
        return F.embedding(positions, self.weight, self.padding_idx)
