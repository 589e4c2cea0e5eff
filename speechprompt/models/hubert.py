"""HuBERT in plain PyTorch, loading fairseq checkpoints key for key without fairseq.

The module tree mirrors fairseq's ``HubertModel`` so that ``hubert_base_ls960.pt`` loads with ``strict=True``::

    feature_extractor.conv_layers.{i}   Sequential(Conv1d, Dropout, [norm], GELU)   7 layers, 320x downsampling
    layer_norm                          LayerNorm over the conv channels (512)
    post_extract_proj                   Linear 512 -> D (absent when the dimensions match)
    mask_emb                            (D,) the pretraining mask vector (unused for feature extraction)
    encoder.pos_conv.0                  grouped Conv1d with weight norm (``weight_g``, ``weight_v``)
    encoder.layers.{i}                  :class:`~speechprompt.models.transformer.TransformerLayer`
    encoder.layer_norm                  LayerNorm (before the layers if post-LN, after them if pre-LN)
    final_proj, label_embs_concat       pretraining heads, kept so that the state dict matches

Typical use::

    model, task_cfg = load_hubert("hubert_base_ls960.pt")
    wav = normalize_waveform(torch.from_numpy(load_audio(path)), task_cfg)
    feats = model.extract_features(wav[None], output_layer=6)  # (1, frames, 768) at 50 Hz
"""

from __future__ import annotations

import ast
import enum
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechprompt.config import ConfigError, from_dict, option
from speechprompt.errors import CheckpointError
from speechprompt.fairseq_compat import load_fairseq_checkpoint
from speechprompt.models.transformer import ACTIVATIONS, LayerKV, TransformerLayer, attention_mask

# --------------------------------------------------------------------------------------------------------------
# Config


class ExtractorMode(str, enum.Enum):
    """Normalisation in the conv front end."""

    DEFAULT = "default"  # GroupNorm (one group per channel) after the first conv only: HuBERT base
    LAYER_NORM = "layer_norm"  # LayerNorm over channels after every conv: HuBERT large/xlarge


_MAX_CONV_LAYERS = 64


def parse_conv_layers(spec: str) -> list[tuple[int, int, int]]:
    """Parse fairseq's ``conv_feature_layers`` string without ``eval``.

    The grammar is Python list arithmetic on ``(dim, kernel, stride)`` tuples of integer literals, for example
    ``"[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"``. The string is parsed by :mod:`ast` and only list,
    tuple, integer, ``+`` and ``*`` nodes are evaluated; anything else is an error.

    Raises:
        ConfigError: the string is not of that form.
    """

    def bad(why: str) -> ConfigError:
        return ConfigError(f"conv_feature_layers {spec!r}: {why}")

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [value(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Add):
                if not (isinstance(left, list) and isinstance(right, list)):
                    raise bad("'+' joins two lists")
                return left + right
            if isinstance(left, int):
                left, right = right, left
            if not (isinstance(left, list) and isinstance(right, int)) or not 0 <= right <= _MAX_CONV_LAYERS:
                raise bad(f"'*' repeats a list 0..{_MAX_CONV_LAYERS} times")
            return left * right
        raise bad(f"unsupported syntax {type(node).__name__}; expected lists of (dim, kernel, stride) tuples")

    try:
        tree = ast.parse(spec.strip(), mode="eval")
    except SyntaxError as e:
        raise bad(f"not a Python list expression ({e.msg})") from None
    layers = value(tree.body)
    if not isinstance(layers, list) or not layers:
        raise bad("expected a non-empty list")
    if len(layers) > _MAX_CONV_LAYERS:
        raise bad(f"more than {_MAX_CONV_LAYERS} layers")
    for layer in layers:
        if not (isinstance(layer, tuple) and len(layer) == 3 and all(isinstance(v, int) and v > 0 for v in layer)):
            raise bad(f"each layer must be (dim, kernel, stride) with positive integers, got {layer!r}")
    return layers


@dataclass
class HubertConfig:
    """Architecture of a HuBERT model. Field names and defaults are those of fairseq's ``HubertConfig``.

    Only what shapes the network or its forward pass is kept. Pretraining-only settings (masking, logit
    temperature, layer drop, ...) are ignored by :meth:`from_fairseq`: they do not change extracted features.
    """

    extractor_mode: ExtractorMode = option(ExtractorMode.DEFAULT, help="conv front-end normalisation: 'default' "
                                           "(GroupNorm on the first conv) or 'layer_norm' (LayerNorm after each)")
    conv_feature_layers: str = option("[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
                                      help="conv front end as a list of (dim, kernel, stride), fairseq's syntax")
    conv_bias: bool = option(False, help="bias in the conv front end")
    encoder_layers: int = option(12, help="transformer layers")
    encoder_embed_dim: int = option(768, help="transformer width D")
    encoder_ffn_embed_dim: int = option(3072, help="FFN hidden size")
    encoder_attention_heads: int = option(12, help="attention heads")
    activation_fn: str = option("gelu", help=f"FFN activation, one of {sorted(ACTIVATIONS)}")
    layer_norm_first: bool = option(False, help="pre-LN layers (large models) instead of post-LN (base)")
    conv_pos: int = option(128, help="kernel size of the convolutional positional embedding")
    conv_pos_groups: int = option(16, help="groups of the convolutional positional embedding")
    dropout: float = option(0.1, help="dropout in the transformer (training mode only)")
    attention_dropout: float = option(0.1, help="dropout on attention weights (training mode only)")
    activation_dropout: float = option(0.0, help="dropout after the FFN activation (training mode only)")
    dropout_input: float = option(0.0, help="dropout on the projected conv features (training mode only)")
    feature_grad_mult: float = option(1.0, help="gradient scale into the conv front end; 0 freezes it")
    final_dim: int = option(0, help="pretraining projection size; <= 0 means encoder_embed_dim")
    untie_final_proj: bool = option(False, help="one pretraining projection per label set")
    target_glu: bool = option(False, help="GLU on the pretraining targets")

    def __post_init__(self) -> None:
        self.extractor_mode = ExtractorMode(self.extractor_mode)
        parse_conv_layers(self.conv_feature_layers)  # a bad string fails here, not at model construction
        if self.activation_fn not in ACTIVATIONS:
            raise ConfigError(f"activation_fn {self.activation_fn!r} is not one of {sorted(ACTIVATIONS)}")
        if self.encoder_embed_dim % self.encoder_attention_heads:
            raise ConfigError(f"encoder_embed_dim {self.encoder_embed_dim} is not divisible by "
                              f"encoder_attention_heads {self.encoder_attention_heads}")
        if self.encoder_embed_dim % self.conv_pos_groups:
            raise ConfigError(f"encoder_embed_dim {self.encoder_embed_dim} is not divisible by "
                              f"conv_pos_groups {self.conv_pos_groups}")
        if self.encoder_layers < 1:
            raise ConfigError("encoder_layers must be at least 1")

    @property
    def conv_layers(self) -> list[tuple[int, int, int]]:
        """``conv_feature_layers`` parsed into ``(dim, kernel, stride)`` tuples."""
        return parse_conv_layers(self.conv_feature_layers)

    @classmethod
    def from_fairseq(cls, model_cfg: Mapping[str, Any]) -> HubertConfig:
        """Build from the ``model`` section of a fairseq checkpoint's ``cfg`` (a plain dict).

        Keys that do not affect feature extraction are ignored. Keys that would change the architecture into one
        this class does not implement (conformer layers, a deep or batch-normed positional conv) are errors.

        Raises:
            ConfigError: an unsupported architecture, or a value of the wrong type.
        """
        name = model_cfg.get("_name")
        if name is not None and name != "hubert":
            raise ConfigError(f"model is {name!r}; only pretrained 'hubert' checkpoints are supported")
        unsupported = {
            "layer_type": (model_cfg.get("layer_type", "transformer"), "transformer"),
            "pos_conv_depth": (model_cfg.get("pos_conv_depth", 1), 1),
            "conv_pos_batch_norm": (model_cfg.get("conv_pos_batch_norm", False), False),
        }
        for key, (got, supported) in unsupported.items():
            if got != supported:
                raise ConfigError(f"{key}={got!r} is not supported (only {supported!r})")
        known = {f.name for f in fields(cls)}
        return from_dict(cls, {k: v for k, v in model_cfg.items() if k in known})

    @classmethod
    def base(cls) -> HubertConfig:
        """``hubert_base_ls960``: 12 post-LN layers of width 768 (94.7M parameters with the pretraining heads)."""
        return cls(final_dim=256, dropout_input=0.1, feature_grad_mult=0.1, untie_final_proj=True)

    @classmethod
    def large(cls) -> HubertConfig:
        """``hubert_large_ll60k``: 24 pre-LN layers of width 1024, LayerNorm after every conv."""
        return cls(extractor_mode=ExtractorMode.LAYER_NORM, encoder_layers=24, encoder_embed_dim=1024,
                   encoder_ffn_embed_dim=4096, encoder_attention_heads=16, layer_norm_first=True, final_dim=768,
                   dropout=0.0, attention_dropout=0.0, untie_final_proj=True)

    @classmethod
    def tiny(cls, layer_norm_first: bool = False) -> HubertConfig:
        """A 2-layer, 32-wide model for tests (conv stride 80, receptive field 100 samples)."""
        return cls(
            extractor_mode=ExtractorMode.LAYER_NORM if layer_norm_first else ExtractorMode.DEFAULT,
            conv_feature_layers="[(16,10,5)] + [(16,3,2)] * 2 + [(16,2,2)] * 2",
            encoder_layers=2, encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=4,
            layer_norm_first=layer_norm_first, conv_pos=8, conv_pos_groups=4, final_dim=8,
            dropout=0.0, attention_dropout=0.0,
        )


# --------------------------------------------------------------------------------------------------------------
# Building blocks (named and nested as fairseq's, so that the state-dict keys match)


class Fp32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 (long sequences overflow half precision)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).type_as(x)


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).type_as(x)


class TransposeLast(nn.Module):
    """Swap the last two dimensions: ``(B, C, T) <-> (B, T, C)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(-2, -1)


class ConvFeatureExtractor(nn.Module):
    """The waveform front end: strided 1-D convolutions, each followed by (optional) normalisation and GELU.

    Input ``(B, T)`` samples; output ``(B, C, frames)`` where ``C`` is the last layer's dim.
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

    def forward(self, source: Tensor) -> Tensor:
        x = source[:, None, :]  # (B, 1, T)
        for conv in self.conv_layers:
            x = conv(x)
        return x  # (B, C, frames)


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
        if torch.is_grad_enabled() and (v.requires_grad or g.requires_grad):
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


class HubertEncoder(nn.Module):
    """Convolutional positional embedding plus the transformer layers. ``(B, frames, D)`` in and out."""

    def __init__(self, cfg: HubertConfig) -> None:
        super().__init__()
        D = cfg.encoder_embed_dim
        self.layer_norm_first = cfg.layer_norm_first
        self.dropout = nn.Dropout(cfg.dropout)
        self.pos_conv = nn.Sequential(WeightNormConv1d(D, cfg.conv_pos, cfg.conv_pos_groups), SamePad(cfg.conv_pos),
                                      nn.GELU())
        self.layers = nn.ModuleList(
            TransformerLayer(D, cfg.encoder_ffn_embed_dim, cfg.encoder_attention_heads,
                             normalize_before=cfg.layer_norm_first, activation=cfg.activation_fn,
                             dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
                             activation_dropout=cfg.activation_dropout)
            for _ in range(cfg.encoder_layers)
        )
        self.layer_norm = nn.LayerNorm(D)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None, last_layer: int | None = None,
                prefix: Sequence[LayerKV | None] | None = None) -> list[Tensor]:
        """Add positions and run the layers up to ``last_layer`` (1-based; ``None`` = all). No final LayerNorm.

        Args:
            x: ``(B, frames, D)`` projected conv features.
            padding_mask: ``(B, frames)`` True at padded frames.
            prefix: per-layer projected keys/values prepended to the attention (see
                :meth:`HubertModel.extract_features`).

        Returns:
            ``[layers' input, layer 1 output, ..., layer last_layer output]``, each ``(B, frames, D)``.
        """
        B, frames, _ = x.shape
        if padding_mask is not None:
            x = x.masked_fill(padding_mask[..., None], 0.0)  # padded frames must not leak through pos_conv
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)  # (B, frames, D)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = self.dropout(x)

        masks: dict[int, Tensor | None] = {}  # by prefix length: layers may carry prefixes of different lengths
        hidden = [x]
        for i, layer in enumerate(self.layers[:last_layer]):
            p = prefix[i] if prefix is not None else None
            n_prefix = len(p) if p is not None else 0
            if n_prefix not in masks:
                key_padding = padding_mask
                if key_padding is not None and n_prefix:
                    # Prefix keys are never padding.
                    key_padding = torch.cat([key_padding.new_zeros(B, n_prefix), key_padding], dim=1)  # (B, P + F)
                masks[n_prefix] = attention_mask(key_padding, frames, past_len=n_prefix, causal=False)
            x = layer(x, attn_mask=masks[n_prefix], prefix=p)
            hidden.append(x)
        return hidden


# --------------------------------------------------------------------------------------------------------------
# The model


class HubertModel(nn.Module):
    """HuBERT: waveform ``(B, T)`` to frame representations ``(B, frames, D)`` at ``sample_rate / 320`` Hz.

    Args:
        cfg: the architecture.
        num_classes: sizes of the pretraining label sets (one per fairseq dictionary); ``None`` or empty builds no
            ``label_embs_concat``, as fairseq does when it has no dictionaries.
        pretraining_heads: build ``final_proj`` (and ``target_glu``); checkpoints stripped of them set False.

    Tuning hooks: :meth:`transformer_layers` exposes the layers (adapter slots, wrapped Linears), and
    :meth:`extract_features` takes per-layer prefix keys/values.
    """

    def __init__(self, cfg: HubertConfig, num_classes: Sequence[int] | None = None,
                 pretraining_heads: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        conv_layers = cfg.conv_layers
        embed = conv_layers[-1][0]
        D = cfg.encoder_embed_dim
        self.encoder_embed_dim = D
        self.downsample = math.prod(stride for _, _, stride in conv_layers)  # samples per frame (320)
        self.receptive_field = 1  # samples per frame's window (400): a shorter input gives no frame
        for _, kernel, stride in reversed(conv_layers):
            self.receptive_field = (self.receptive_field - 1) * stride + kernel
        self.feature_extractor = ConvFeatureExtractor(conv_layers, cfg.extractor_mode, cfg.conv_bias)
        self.layer_norm = nn.LayerNorm(embed)
        self.post_extract_proj = nn.Linear(embed, D) if embed != D else None
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.mask_emb = nn.Parameter(torch.empty(D).uniform_())
        self.encoder = HubertEncoder(cfg)

        final_dim = cfg.final_dim if cfg.final_dim > 0 else D
        num_classes = list(num_classes or [])
        self.target_glu = None
        self.final_proj = None
        if pretraining_heads:
            if cfg.target_glu:
                self.target_glu = nn.Sequential(nn.Linear(final_dim, final_dim * 2), nn.GLU())
            n_proj = max(len(num_classes), 1) if cfg.untie_final_proj else 1
            self.final_proj = nn.Linear(D, final_dim * n_proj)
        self.num_classes = num_classes
        self.label_embs_concat = (
            nn.Parameter(torch.empty(sum(num_classes), final_dim).uniform_()) if num_classes else None
        )

    @property
    def num_layers(self) -> int:
        return len(self.encoder.layers)

    def transformer_layers(self) -> nn.ModuleList:
        """The encoder's :class:`TransformerLayer` s, in order (where tuning methods attach)."""
        return self.encoder.layers

    def frame_padding_mask(self, padding_mask: Tensor, num_frames: int) -> Tensor:
        """Downsample a sample-level padding mask ``(B, T)`` (True = padding) to frames ``(B, num_frames)``.

        As fairseq's HuBERT: drop the ``T mod num_frames`` trailing samples, split the rest into ``num_frames``
        equal chunks, and call a frame padding only if its whole chunk is.
        """
        B, T = padding_mask.shape
        extra = T % num_frames
        if extra:
            padding_mask = padding_mask[:, : T - extra]
        return padding_mask.reshape(B, num_frames, -1).all(dim=-1)  # (B, frames)

    def _features(self, source: Tensor) -> Tensor:
        """Conv front end, ``(B, T)`` -> ``(B, frames, C)``, with fairseq's ``feature_grad_mult``."""
        mult = self.cfg.feature_grad_mult
        if mult <= 0:
            with torch.no_grad():
                feats = self.feature_extractor(source)
        else:
            feats = self.feature_extractor(source)
            if mult != 1.0 and feats.requires_grad:
                # Exactly the same value (the difference is 0); the gradient into the front end is scaled.
                feats = feats.detach() + (feats - feats.detach()) * mult
        return feats.transpose(1, 2)  # (B, frames, C)

    def _run(self, source: Tensor, padding_mask: Tensor | None, last_layer: int,
             prefix: Sequence[LayerKV | None] | None) -> tuple[list[Tensor], Tensor | None]:
        """Run up to ``last_layer`` (1-based; 0 = only the layers' input) and return every hidden state so far.

        Returns:
            ``[input, layer 1, ..., layer last_layer]``, each ``(B, frames, D)``, and the frame padding mask.
        """
        if source.dim() != 2:
            raise ValueError(f"source must be (B, T) samples, got shape {tuple(source.shape)}")
        if prefix is not None and len(prefix) != self.num_layers:
            raise ValueError(f"prefix has {len(prefix)} entries; the encoder has {self.num_layers} layers")
        if source.shape[1] < self.receptive_field:
            raise ValueError(f"input of {source.shape[1]} samples is shorter than the conv front end's receptive "
                             f"field ({self.receptive_field} samples): it gives no frame")
        x = self.layer_norm(self._features(source))  # (B, frames, C)
        if padding_mask is not None:
            padding_mask = self.frame_padding_mask(padding_mask.to(torch.bool), x.shape[1])  # (B, frames)
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)  # (B, frames, D)
        x = self.dropout_input(x)

        hidden = self.encoder(x, padding_mask, last_layer, prefix)
        return hidden, padding_mask

    def extract_features(
        self,
        source: Tensor,
        padding_mask: Tensor | None = None,
        output_layer: int | None = None,
        prefix: Sequence[LayerKV | None] | None = None,
    ) -> Tensor:
        """Frame representations from the output of one transformer layer, as fairseq's ``extract_features``.

        Args:
            source: ``(B, T)`` waveform (layer-normed first if the checkpoint's task says ``normalize``: see
                :func:`normalize_waveform`).
            padding_mask: ``(B, T)`` bool, True at padded samples. As in fairseq, padding still takes part in
                the conv front end (and in base models' GroupNorm statistics); it is masked from the
                positional conv onwards. Get the frame-level mask with :meth:`frame_padding_mask`.
            output_layer: 1-based layer whose output is returned; only layers up to it are computed. ``None``
                runs all layers and, for pre-LN models, applies the final ``encoder.layer_norm`` (which is not
                applied when a layer is named, even the last one: fairseq's behaviour).
            prefix: one :class:`LayerKV` (or ``None``) per layer: projected keys/values ``(B or 1, H, P, hd)``
                prepended to that layer's attention (prefix tuning). They are never masked.

        Returns:
            ``(B, frames, D)`` with ``frames`` about ``T / 320`` for the standard front end.
        """
        if output_layer is not None and not 1 <= output_layer <= self.num_layers:
            raise ValueError(f"output_layer {output_layer} is out of range 1..{self.num_layers}")
        hidden, _ = self._run(source, padding_mask, output_layer or self.num_layers, prefix)
        x = hidden[-1]
        if output_layer is None and self.encoder.layer_norm_first:
            x = self.encoder.layer_norm(x)
        return x

    def hidden_states(
        self,
        source: Tensor,
        padding_mask: Tensor | None = None,
        prefix: Sequence[LayerKV | None] | None = None,
    ) -> tuple[list[Tensor], Tensor | None]:
        """Every hidden state, for a learned weighted sum of layers.

        Returns:
            ``num_layers + 1`` tensors ``(B, frames, D)``: the transformer's input (after the positional conv,
            and its LayerNorm in post-LN models), then each layer's output (no final LayerNorm); and the
            ``(B, frames)`` frame padding mask (``None`` without ``padding_mask``).
        """
        return self._run(source, padding_mask, self.num_layers, prefix)

    def remove_pretraining_modules(self) -> None:
        """Drop the pretraining heads, which feature extraction never uses (fairseq's method of the same name)."""
        self.final_proj = self.target_glu = self.label_embs_concat = None


# --------------------------------------------------------------------------------------------------------------
# Loading


def normalize_waveform(wav: Tensor, task_cfg: Mapping[str, Any]) -> Tensor:
    """Layer-norm a waveform over all its samples iff the checkpoint's task config says ``normalize``.

    HuBERT large/xlarge were trained on normalised audio, base was not. Normalise each utterance on its own,
    before padding it into a batch, as fairseq's dataset does.

    Args:
        wav: ``(T,)`` waveform of one utterance.
        task_cfg: the task section returned by :func:`load_hubert`.
    """
    if not task_cfg.get("normalize", False):
        return wav
    return F.layer_norm(wav, wav.shape)


def load_hubert(path: str | os.PathLike) -> tuple[HubertModel, dict[str, Any]]:
    """Load a fairseq HuBERT pretraining checkpoint (``hubert_base_ls960.pt`` and kin) without fairseq.

    The file is read through the safe unpickler of :mod:`speechprompt.fairseq_compat`; nothing in it is executed.

    Returns:
        The model in eval mode, and the task config (a plain dict; see :func:`normalize_waveform`).

    Raises:
        CheckpointError: unreadable file, unsupported architecture, or state-dict keys/shapes that do not match
            the architecture its config describes (the message lists them).
        UnsafeCheckpointError: the pickle asks for anything outside the allow-list.
    """
    ckpt = load_fairseq_checkpoint(path)
    cfg = ckpt["cfg"]
    try:
        model_cfg = HubertConfig.from_fairseq(cfg.get("model") or {})
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    task_cfg = dict(cfg.get("task") or {})
    dictionaries = ckpt["task_state"].get("dictionaries") or []
    state = ckpt["model"]
    # The pretraining heads may have been stripped (fairseq's remove_pretraining_modules); all else must match.
    has_heads = any(k.startswith("final_proj.") for k in state)
    num_classes = [len(d) for d in dictionaries if d is not None] if "label_embs_concat" in state else []
    model = HubertModel(model_cfg, num_classes, pretraining_heads=has_heads)

    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong_shape:
        def listed(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")

        problems = []
        if missing:
            problems.append(f"missing keys: {listed(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {listed(unexpected)}")
        if wrong_shape:
            problems.append("wrong shapes: " + listed(
                [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong_shape]))
        raise CheckpointError(f"{path}: does not match the HuBERT architecture its config describes; "
                              + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    return model.eval(), task_cfg
