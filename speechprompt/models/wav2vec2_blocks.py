"""The building blocks of the wav2vec 2.0 family, named and nested as fairseq's so that state-dict keys match: the
waveform conv front end (and the parameter-free fbank one), the convolutional positional embedding (weight-normed,
run through FFTs), and WavLM's gated relative position bias. Assembled in :mod:`speechprompt.models.wav2vec2`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechprompt.audio import fbank
from speechprompt.models.lean_ops import records_grad
from speechprompt.models.transformer import MultiheadAttention
from speechprompt.models.wav2vec2_config import ExtractorMode, Wav2Vec2Config

# --------------------------------------------------------------------------------------------------------------
# Building blocks (named and nested as fairseq's, so that the state-dict keys match)


class Fp32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 (long sequences overflow half precision)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).type_as(x)


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (with or without affine parameters)."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class TransposeLast(nn.Module):
    """Swap the last two dimensions: ``(B, C, T) <-> (B, T, C)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(-2, -1)


class ConvFeatureExtractor(nn.Module):
    """The waveform front end: strided 1-D convolutions, each followed by (optional) normalisation and GELU.

    Input ``(B, T)`` samples; output ``(B, C, frames)`` where ``C`` is the last layer's dim.

    ``conv_adapters[i]`` is an adapter slot after conv block ``i`` (``(B, C_i, T_i)`` in and out), ``None`` until a
    tuning method sets it (CHAPTER's CNN adapters), so the state dict and the outputs are the checkpoint's.
    """

    def __init__(self, layers: Sequence[tuple[int, int, int]], mode: ExtractorMode, conv_bias: bool) -> None:
        super().__init__()
        self.conv_layers = nn.ModuleList()
        in_dim = 1
        for i, (dim, kernel, stride) in enumerate(layers):
            # Index 1 is fairseq's (always zero) Dropout; keeping it keeps the norm at index 2, as in the keys.
            block: list[nn.Module] = [nn.Conv1d(in_dim, dim, kernel, stride=stride, bias=conv_bias), nn.Dropout(0.0)]
            if mode == ExtractorMode.LAYER_NORM:
                block.append(nn.Sequential(TransposeLast(), Fp32LayerNorm(dim), TransposeLast()))
            elif i == 0:
                block.append(Fp32GroupNorm(dim, dim))
            block.append(nn.GELU())
            self.conv_layers.append(nn.Sequential(*block))
            in_dim = dim
        self.conv_adapters = nn.ModuleList([None] * len(layers))

    @property
    def adapted(self) -> bool:
        """Whether any adapter slot is set."""
        return any(adapter is not None for adapter in self.conv_adapters)

    def forward(self, source: Tensor, lengths: Tensor | None = None) -> Tensor:
        """``(B, T)`` samples -> ``(B, C, frames)``.

        ``lengths`` ``(B,)``: the real samples of each row of a right-padded batch. Given, each row runs through the
        stack alone, on its own samples, and its frames are zero-padded to the batch's frame count: a GroupNorm
        front end (base models) then normalises each utterance over its own samples only (fairseq and
        transformers normalise over the padding too, so that a row's features depend on its batch), and the convs
        spend nothing on padding. A row shorter than the receptive field gives no frame.
        """
        if lengths is not None:
            frames = self._frames(source.shape[1])
            rows = [self._stack(source[b : b + 1, : int(n)]) if self._frames(int(n)) else None
                    for b, n in enumerate(lengths.tolist())]
            out = source.new_zeros(source.shape[0], self.conv_layers[-1][0].out_channels, frames)  # (B, C, frames)
            for b, row in enumerate(rows):
                if row is not None:
                    out[b, :, : row.shape[-1]] = row[0]
            return out
        return self._stack(source)

    def _frames(self, samples: int) -> int:
        """Frames the stack gives for ``samples`` samples (0 below its receptive field)."""
        for block in self.conv_layers:
            conv = block[0]
            samples = max((samples - conv.kernel_size[0]) // conv.stride[0] + 1, 0)
        return samples

    def _stack(self, source: Tensor) -> Tensor:
        x = source[:, None, :]  # (B, 1, T)
        for conv, adapter in zip(self.conv_layers, self.conv_adapters):
            x = conv(x)  # (B, C_i, T_i)
            if adapter is not None:
                x = adapter(x)
        return x  # (B, C, frames)


class FbankFeatureExtractor(nn.Module):
    """The light front end: Kaldi log-mel energies (:func:`speechprompt.audio.fbank`, 25 ms povey window, 10 ms hop)
    of each row, ``stack`` consecutive frames concatenated, as MelHuBERT feeds its transformer.

    Input ``(B, T)`` samples; output ``(B, n_mels * stack, frames)`` with ``frames = (1 + (T - 400) // 160) // stack``
    (the geometry of :attr:`Wav2Vec2Config.frame_layers`). It has no parameters and passes no gradient: the model's
    ``layer_norm`` and ``post_extract_proj`` are the first trained layers, as after the conv stack.
    """

    adapted = False  # no convolutions, so no slots for CNN adapters

    def __init__(self, n_mels: int, stack: int) -> None:
        super().__init__()
        self.n_mels, self.stack = n_mels, stack

    def forward(self, source: Tensor) -> Tensor:
        rows = []
        # float32 even under autocast: a bf16 power spectrum would lose the small energies the log reads.
        with torch.no_grad(), torch.autocast(source.device.type, enabled=False):
            for wav in source.float():  # one waveform at a time
                feats = fbank(wav, n_mels=self.n_mels)  # (frames10, M)
                usable = feats.shape[0] // self.stack * self.stack
                rows.append(feats[:usable].reshape(-1, self.stack * self.n_mels))  # (frames, stack * M)
        return torch.stack(rows).transpose(1, 2)  # (B, stack * M, frames)


class WeightNormConv1d(nn.Module):
    """``Conv1d`` whose weight is ``weight_g * weight_v / ||weight_v||``, the norm taken per kernel tap (dim 2).

    This is ``torch.nn.utils.weight_norm(conv, dim=2)`` written out, so that the parameters keep the names
    ``weight_g``/``weight_v`` that fairseq checkpoints use (torch's newer parametrization renames them).

    In float32/64 the convolution runs through FFTs (overlap-save): HuBERT base's kernel of 128 taps over 48
    channels per group made the direct grouped convolution about a tenth of a layer-6 extraction, and the FFT does
    it in a third of that time for one utterance, a fifth for a batch of 8. The result equals the direct
    convolution up to float rounding, and is the same whether or not autograd is on. With the weights frozen (no
    gradient wanted for them: feature extraction, or tuning methods that leave them alone) their spectrum is
    computed once and kept until they change: ``groups * bins * (C/groups)^2`` complex numbers (76 MB for HuBERT
    base). Other dtypes (bf16 has no FFT) take the direct convolution.
    """

    # Overlap-save blocks: the FFT length (at least this, and twice the kernel), so that one cached spectrum
    # serves every input length.
    fft_size = 512

    def __init__(self, channels: int, kernel_size: int, groups: int) -> None:
        super().__init__()
        self.padding, self.groups = kernel_size // 2, groups
        weight_v = torch.empty(channels, channels // groups, kernel_size)
        # fairseq's init (make_conv_pos); the norm is then absorbed into weight_g.
        nn.init.normal_(weight_v, mean=0.0, std=math.sqrt(4.0 / (kernel_size * channels)))
        self.weight_v = nn.Parameter(weight_v)
        self.weight_g = nn.Parameter(self._norm(weight_v).detach().clone())
        self.bias = nn.Parameter(torch.zeros(channels))
        self._cache: tuple[tuple[Any, ...], Tensor] | None = None  # (key of the weights' state, spectrum)

    @staticmethod
    def _norm(v: Tensor) -> Tensor:
        return v.norm(dim=(0, 1), keepdim=True)  # (1, 1, K)

    @property
    def weight(self) -> Tensor:
        """``(C, C / groups, K)``: torch's fused weight-norm kernel, the one fairseq's ``weight_norm`` hook runs."""
        return torch._weight_norm(self.weight_v, self.weight_g, 2)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in (torch.float32, torch.float64) and self.weight_v.dtype == x.dtype:
            return self._fft_conv(x) + self.bias[:, None]
        return F.conv1d(x, self.weight, self.bias, padding=self.padding, groups=self.groups)

    def _spectrum(self, n: int) -> Tensor:
        """``(groups, n // 2 + 1, C/groups out, C/groups in)``: the conjugate spectrum of the weight; cached while
        the weights are frozen (the key changes with any in-place update, reload or move of them)."""
        v, g = self.weight_v, self.weight_g
        if records_grad(v, g):  # trained weights: a fresh spectrum that autograd can go through
            self._cache = None
            return self._compute_spectrum(n)
        key = (n, v._version, g._version, v.data_ptr(), g.data_ptr(), v.dtype, v.device)
        if self._cache is None or self._cache[0] != key:
            # A normal tensor even under inference mode: a later call with autograd may save it for backward.
            with torch.inference_mode(False), torch.no_grad():
                self._cache = (key, self._compute_spectrum(n))
        return self._cache[1]

    def _compute_spectrum(self, n: int) -> Tensor:
        C, Cg, _ = self.weight_v.shape
        spec = torch.fft.rfft(self.weight, n=n).conj()  # (C, Cg, F)
        return spec.view(self.groups, C // self.groups, Cg, -1).permute(0, 3, 1, 2).contiguous()

    def _fft_conv(self, x: Tensor) -> Tensor:
        """``F.conv1d(x, weight, padding=self.padding, groups=self.groups)`` (no bias) by overlap-save FFTs.

        ``y[t] = sum_k w[k] z[t + k]`` over the padded input ``z`` is, per block of ``n`` samples, a circular
        cross-correlation: ``irfft(conj(W) * Z)``, valid for its first ``n - K + 1`` outputs.
        """
        B, C, T = x.shape
        K = self.weight_v.shape[-1]
        n = max(self.fft_size, 1 << (2 * K - 1).bit_length())
        hop = n - K + 1
        out_len = T + 2 * self.padding - K + 1
        blocks = -(-out_len // hop)
        z = F.pad(x, (self.padding, blocks * hop + K - 1 - T - self.padding))  # (B, C, blocks * hop + K - 1)
        segments = z.unfold(2, n, hop)  # (B, C, blocks, n), overlapping views
        G, Cg = self.groups, C // self.groups
        X = torch.fft.rfft(segments, n=n)  # (B, C, blocks, F)
        X = X.view(B, G, Cg, blocks, -1).permute(1, 4, 2, 0, 3).reshape(G, X.shape[-1], Cg, B * blocks)
        Y = torch.matmul(self._spectrum(n), X)  # (G, F, Cg out, B * blocks)
        Y = Y.view(G, -1, Cg, B, blocks).permute(3, 0, 2, 4, 1).reshape(B, C, blocks, -1)  # (B, C, blocks, F)
        y = torch.fft.irfft(Y, n=n)[..., :hop]  # (B, C, blocks, hop): the outputs without wrap-around
        return y.reshape(B, C, blocks * hop)[:, :, :out_len]


class SamePad(nn.Module):
    """Trim the conv output back to the input length: an even kernel with ``padding = k // 2`` adds one frame."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, : x.shape[-1] - self.remove]


def positional_conv(cfg: Wav2Vec2Config) -> nn.Sequential:
    """The convolutional positional embedding, ``(B, D, frames)`` in and out (see the module docstring)."""
    D = cfg.encoder_embed_dim
    if cfg.pos_conv_depth == 1:
        return nn.Sequential(WeightNormConv1d(D, cfg.conv_pos, cfg.conv_pos_groups), SamePad(cfg.conv_pos), nn.GELU())
    k = max(3, cfg.conv_pos // cfg.pos_conv_depth)  # fairseq's rule (data2vec: 95 // 5 = 19)
    return nn.Sequential(*[
        nn.Sequential(nn.Conv1d(D, D, k, padding=k // 2, groups=cfg.conv_pos_groups), SamePad(k), TransposeLast(),
                      Fp32LayerNorm(D, elementwise_affine=False), TransposeLast(), nn.GELU())
        for _ in range(cfg.pos_conv_depth)
    ])


# --------------------------------------------------------------------------------------------------------------
# WavLM's gated relative position bias


def relative_position_buckets(relative: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """T5-style bidirectional buckets of ``key - query`` distances, as WavLM computes them.

    Half the buckets are for positive distances; within a half, distances below a quarter of the buckets are exact
    and larger ones share logarithmically wider buckets up to ``max_distance``.
    """
    half = num_buckets // 2
    buckets = (relative > 0).long() * half
    distance = relative.abs()
    max_exact = half // 2
    # log(0) is -inf here, but distance 0 is always "small" and takes the other branch.
    large = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                         * (half - max_exact)).long()
    large = large.clamp(max=half - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


def add_relative_position_gate(attn: MultiheadAttention, has_bias_table: bool, cfg: Wav2Vec2Config) -> None:
    """Give one layer's attention WavLM's parameters, under WavLM's names: the gate ``grep_linear`` (head_dim -> 8)
    and ``grep_a`` (1, H, 1, 1), and in the first layer the bias table ``relative_attention_bias``."""
    H = cfg.encoder_attention_heads
    if cfg.gru_rel_pos:
        attn.grep_linear = nn.Linear(attn.head_dim, 8)
        attn.grep_a = nn.Parameter(torch.ones(1, H, 1, 1))
    if has_bias_table:
        attn.relative_attention_bias = nn.Embedding(cfg.num_buckets, H)


def gated_position_bias(attn: MultiheadAttention, x: Tensor, bias: Tensor) -> Tensor:
    """WavLM's gate on the shared bias: each head scales it per query by ``a * (b * grep_a - 1) + 2``, where
    ``a, b`` are sigmoids of a projection of that head's slice of the attention input ``x`` ``(B, T, D)``.

    Returns:
        ``(B, H, T, T)``.
    """
    if not hasattr(attn, "grep_linear"):
        return bias
    B, T, _ = x.shape
    heads = x.view(B, T, attn.num_heads, attn.head_dim).transpose(1, 2)  # (B, H, T, hd)
    gates = torch.sigmoid(attn.grep_linear(heads).view(B, attn.num_heads, T, 2, 4).sum(-1))  # (B, H, T, 2)
    gate_a, gate_b = gates.chunk(2, dim=-1)  # (B, H, T, 1) each
    return (gate_a * (gate_b * attn.grep_a - 1.0) + 2.0) * bias  # (B, H, T, T)

