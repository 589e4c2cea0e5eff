"""The wav2vec 2.0 family in plain PyTorch: wav2vec 2.0, HuBERT, data2vec-audio and WavLM share one encoder.

All four are the same network with small variations, so they are one class, :class:`Wav2Vec2Model`, configured by
:class:`Wav2Vec2Config` (fairseq's field names). The module tree mirrors fairseq's, so fairseq checkpoints load key
for key (Hugging Face directories go through the key tables of :mod:`speechprompt.models.hf_keys`)::

    feature_extractor.conv_layers.{i}  Sequential(Conv1d, Dropout, [norm], GELU): strided convs over the waveform;
                                       GroupNorm after the first ("default") or LayerNorm after each ("layer_norm")
    feature_extractor.conv_adapters.{i}  an adapter slot after each conv block, empty (``None``) unless a tuning
                                       method (CNN adapters) sets it
                                       (``frontend: fbank``, the light front end: no parameters, see
                                       :class:`FbankFeatureExtractor`)
    layer_norm                         LayerNorm over the conv channels
    post_extract_proj                  Linear C -> D (fairseq: only when C != D; Hugging Face: always)
    mask_emb                           (D,) the pretraining mask vector (unused for feature extraction)
    encoder.pos_conv                   the convolutional positional embedding, one of
                                         * ``.0`` a grouped Conv1d with weight norm (``weight_g``/``weight_v``)
                                           (wav2vec 2.0, HuBERT, WavLM; ``pos_conv_depth = 1``)
                                         * ``.{j}.0`` a stack of ``pos_conv_depth`` grouped Conv1d, each followed by
                                           a LayerNorm without parameters and GELU (data2vec-audio)
    encoder.layers.{i}                 :class:`~speechprompt.models.transformer.TransformerLayer`; WavLM adds
                                       ``self_attn.grep_linear``/``self_attn.grep_a`` (the gate of the relative
                                       position bias) and, in layer 0, ``self_attn.relative_attention_bias``
    encoder.layer_norm                 LayerNorm (before the layers if post-LN, after them if pre-LN)

Pretraining-only tensors of a checkpoint (wav2vec 2.0's quantizer, ``project_q``, ``final_proj`` ...) are never used
to extract features; :meth:`Wav2Vec2Model.keep_pretraining_tensors` keeps them as frozen buffers under their own
names, so that the state dict (and its fingerprint) is the checkpoint's, and :meth:`remove_pretraining_modules`
drops them. HuBERT's own pretraining heads are real modules (:mod:`speechprompt.models.hubert`).

Interface (the same for every encoder of the toolkit, :class:`~speechprompt.models.ast.ASTModel` included)::

    hidden, frame_mask = model.hidden_states(wav, padding_mask, **method.forward_kwargs(B))  # L+1 x (B, F, D)
    feats = model.extract_features(wav, padding_mask, output_layer=6)                        # (B, F, D)
"""

from __future__ import annotations

import ast
import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechprompt.audio import fbank
from speechprompt.config import ConfigError, from_dict, option
from speechprompt.models.transformer import ACTIVATIONS, LayerKV, MultiheadAttention, TransformerLayer, attention_mask

# --------------------------------------------------------------------------------------------------------------
# Config


class ExtractorMode(str, enum.Enum):
    """Normalisation in the conv front end."""

    DEFAULT = "default"  # GroupNorm (one group per channel) after the first conv only: base models
    LAYER_NORM = "layer_norm"  # LayerNorm over channels after every conv: large models, data2vec, XLS-R


class FrontEnd(str, enum.Enum):
    """What turns the waveform into frames. The config stores the plain string, as :class:`FramePadding`."""

    CONV = "conv"  # the strided conv stack of ``conv_feature_layers``: every published checkpoint
    FBANK = "fbank"  # stacked Kaldi log-mel frames (MelHuBERT's light front end): no conv to train or run


FBANK_WINDOW, FBANK_HOP = 400, 160  # samples of one 25 ms fbank frame and of its 10 ms hop, at 16 kHz


class FramePadding(str, enum.Enum):
    """How a sample-level padding mask becomes a frame-level one; each original implementation has its own rule.

    The config stores the plain string (a checkpoint that pickles a config's fields then holds no foreign class).
    """

    LENGTHS = "lengths"  # fairseq wav2vec 2.0/data2vec and every HF model: frames past the conv output length
    CHUNKS = "chunks"  # fairseq HuBERT: a frame is padding iff its whole chunk of ``T // frames`` samples is


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


def conv_layers_spec(layers: Sequence[tuple[int, int, int]]) -> str:
    """The ``conv_feature_layers`` string of explicit ``(dim, kernel, stride)`` layers (what HF configs list)."""
    return "[" + ", ".join(f"({d}, {k}, {s})" for d, k, s in layers) + "]"


# fairseq/WavLM config keys that would change the network into one this module does not implement.
_UNSUPPORTED_FAIRSEQ: dict[str, Any] = {
    "layer_type": "transformer",
    "conv_pos_batch_norm": False,
    "crop_seq_to_multiple": 1,
    "quantize_input": False,
    "expand_attention_head_size": -1,
}


@dataclass
class Wav2Vec2Config:
    """Architecture of a wav2vec 2.0-family encoder. Field names and defaults are fairseq's ``Wav2Vec2Config``
    (and, for the relative position bias, WavLM's).

    Only what shapes the network or its forward pass is kept; pretraining-only settings (masking, quantizer
    temperatures, layer drop, ...) do not change extracted features and are ignored by :meth:`from_fairseq`.
    The last group of fields has no fairseq counterpart: it records how a Hugging Face model differs.
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
    layer_norm_first: bool = option(False, help="pre-LN layers (large/LV-60/XLS-R models) instead of post-LN (base)")
    conv_pos: int = option(128, help="kernel size of the convolutional positional embedding (with "
                           "pos_conv_depth > 1: the total, each conv gets max(3, conv_pos // pos_conv_depth))")
    conv_pos_groups: int = option(16, help="groups of the convolutional positional embedding")
    pos_conv_depth: int = option(1, help="1: one weight-normed conv; > 1: data2vec's stack of layer-normed convs")
    dropout: float = option(0.1, help="dropout in the transformer (training mode only)")
    attention_dropout: float = option(0.1, help="dropout on attention weights (training mode only)")
    activation_dropout: float = option(0.0, help="dropout after the FFN activation (training mode only)")
    dropout_input: float = option(0.0, help="dropout on the projected conv features (training mode only)")
    feature_grad_mult: float = option(1.0, help="gradient scale into the conv front end; 0 freezes it")
    layer_norm_eps: float = option(1e-5, help="epsilon of the feature and transformer LayerNorms")
    relative_position_embedding: bool = option(False, help="WavLM's gated relative position bias")
    num_buckets: int = option(320, help="relative position buckets (WavLM)")
    max_distance: int = option(800, help="largest distinguished relative distance, in frames (WavLM)")
    gru_rel_pos: bool = option(True, help="gate the relative position bias by the attention input (WavLM)")
    frame_padding: str = option(FramePadding.LENGTHS.value, help="sample -> frame padding rule: 'lengths' "
                                         "(wav2vec 2.0, data2vec, every HF model) or 'chunks' (fairseq HuBERT)")
    feature_layer_norm: bool = option(True, help="LayerNorm the conv features (HF HuBERT's feat_proj_layer_norm)")
    always_project: bool = option(False, help="build post_extract_proj even when the conv and encoder widths match "
                                  "(HF models always have one)")
    has_mask_emb: bool = option(True, help="the checkpoint has the pretraining mask vector")
    frontend: str = option(FrontEnd.CONV.value, help="conv (the waveform conv stack of conv_feature_layers) or fbank "
                           "(fbank_mels log-mel energies every 10 ms, fbank_stack frames concatenated: the light front "
                           "end for small compute; not a fairseq architecture)")
    fbank_mels: int = option(40, help="fbank front end: mel filters per 25 ms frame")
    fbank_stack: int = option(2, help="fbank front end: consecutive 10 ms frames concatenated into one (2: 50 Hz)")

    def __post_init__(self) -> None:
        self.extractor_mode = ExtractorMode(self.extractor_mode)
        if self.frontend not in {m.value for m in FrontEnd}:
            raise ConfigError(f"frontend {self.frontend!r} is not one of {[m.value for m in FrontEnd]}")
        self.frontend = FrontEnd(self.frontend).value
        if self.fbank_mels < 1 or self.fbank_stack < 1:
            raise ConfigError("fbank_mels and fbank_stack must be at least 1")
        if self.frame_padding not in {m.value for m in FramePadding}:
            raise ConfigError(f"frame_padding {self.frame_padding!r} is not one of {[m.value for m in FramePadding]}")
        self.frame_padding = FramePadding(self.frame_padding).value
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
        if self.pos_conv_depth < 1:
            raise ConfigError("pos_conv_depth must be at least 1")
        if self.relative_position_embedding and (self.num_buckets < 2 or self.max_distance < self.num_buckets // 4):
            raise ConfigError(f"num_buckets {self.num_buckets} / max_distance {self.max_distance}: need at least 2 "
                              "buckets and max_distance >= num_buckets // 4")

    @property
    def conv_layers(self) -> list[tuple[int, int, int]]:
        """``conv_feature_layers`` parsed into ``(dim, kernel, stride)`` tuples."""
        return parse_conv_layers(self.conv_feature_layers)

    @property
    def frame_layers(self) -> list[tuple[int, int, int]]:
        """The front end's geometry as ``(dim, kernel, stride)`` layers: the conv stack, or for the fbank front end
        its 25 ms / 10 ms framing followed by the stacking of ``fbank_stack`` frames. Frame counts, the receptive
        field and the samples per frame all follow from it, whichever the front end."""
        if self.frontend == FrontEnd.FBANK:
            return [(self.fbank_mels, FBANK_WINDOW, FBANK_HOP),
                    (self.fbank_mels * self.fbank_stack, self.fbank_stack, self.fbank_stack)]
        return self.conv_layers

    def num_frames(self, num_samples: int) -> int:
        """Frames the front end gives for ``num_samples`` samples (0 below its receptive field)."""
        n = num_samples
        for _, kernel, stride in self.frame_layers:
            n = max((n - kernel) // stride + 1, 0)
        return n

    @classmethod
    def from_fairseq(cls, model_cfg: Mapping[str, Any], **overrides: Any) -> Wav2Vec2Config:
        """Build from a fairseq ``model`` config section (or WavLM's flat ``cfg``), a plain dict.

        Keys that do not affect feature extraction are ignored. Keys that would change the architecture into one
        this class does not implement (conformer layers, a batch-normed positional conv, a quantized input) are
        errors. ``overrides`` set fields that the checkpoint format implies (e.g. HuBERT's padding rule).

        Raises:
            ConfigError: an unsupported architecture, or a value of the wrong type.
        """
        for key, supported in _UNSUPPORTED_FAIRSEQ.items():
            got = model_cfg.get(key, supported)
            if got is not None and got != supported:
                raise ConfigError(f"{key}={got!r} is not supported (only {supported!r})")
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in model_cfg.items() if k in known and v is not None}
        data.update(overrides)
        return from_dict(cls, data)


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

    def forward(self, source: Tensor) -> Tensor:
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


# --------------------------------------------------------------------------------------------------------------
# The encoder


class Wav2Vec2Encoder(nn.Module):
    """Convolutional positional embedding plus the transformer layers. ``(B, frames, D)`` in and out."""

    def __init__(self, cfg: Wav2Vec2Config) -> None:
        super().__init__()
        D = cfg.encoder_embed_dim
        self.layer_norm_first = cfg.layer_norm_first
        self.relative_position = cfg.relative_position_embedding
        self.num_buckets, self.max_distance = cfg.num_buckets, cfg.max_distance
        self.dropout = nn.Dropout(cfg.dropout)
        self.pos_conv = positional_conv(cfg)
        self.layers = nn.ModuleList(
            TransformerLayer(D, cfg.encoder_ffn_embed_dim, cfg.encoder_attention_heads,
                             normalize_before=cfg.layer_norm_first, activation=cfg.activation_fn,
                             dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
                             activation_dropout=cfg.activation_dropout, layer_norm_eps=cfg.layer_norm_eps)
            for _ in range(cfg.encoder_layers)
        )
        if self.relative_position:
            for i, layer in enumerate(self.layers):
                add_relative_position_gate(layer.self_attn, i == 0, cfg)
        self.layer_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)

    def position_bias(self, frames: int) -> Tensor:
        """WavLM's relative position bias ``(1, H, frames, frames)``, from the first layer's table."""
        table = self.layers[0].self_attn.relative_attention_bias
        pos = torch.arange(frames, device=table.weight.device)
        buckets = relative_position_buckets(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)
        return table(buckets).permute(2, 0, 1)[None]  # (1, H, T, T)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None, last_layer: int | None = None,
                prefix: Sequence[LayerKV | None] | None = None, layerdrop: float = 0.0) -> list[Tensor]:
        """Add positions and run the layers up to ``last_layer`` (1-based; ``None`` = all). No final LayerNorm.

        Args:
            x: ``(B, frames, D)`` projected conv features.
            padding_mask: ``(B, frames)`` True at padded frames.
            prefix: per-layer projected keys/values prepended to the attention (see
                :meth:`Wav2Vec2Model.extract_features`).
            layerdrop: in training mode, skip each layer with this probability (fairseq's ``encoder_layerdrop``;
                a skipped layer passes its input on, drawn from torch's RNG).

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
        bias = self.position_bias(frames).to(x.dtype) if self.relative_position else None  # (1, H, T, T)

        masks: dict[int, Tensor | None] = {}  # by prefix length: layers may carry prefixes of different lengths
        hidden = [x]
        for i, layer in enumerate(self.layers[:last_layer]):
            if layerdrop and self.training and float(torch.rand(())) < layerdrop:
                hidden.append(x)
                continue
            p = prefix[i] if prefix is not None else None
            n_prefix = len(p) if p is not None else 0
            if n_prefix not in masks:
                key_padding = padding_mask
                if key_padding is not None and n_prefix:
                    # Prefix keys are never padding.
                    key_padding = torch.cat([key_padding.new_zeros(B, n_prefix), key_padding], dim=1)  # (B, P + F)
                masks[n_prefix] = attention_mask(key_padding, frames, past_len=n_prefix, causal=False)
            layer_bias = None
            if bias is not None:
                # The gate reads the attention's input: the layer-normed x in pre-LN layers.
                attn_in = layer.self_attn_layer_norm(x) if layer.normalize_before else x
                layer_bias = gated_position_bias(layer.self_attn, attn_in, bias)  # (B, H, T, T)
            x = layer(x, attn_mask=masks[n_prefix], prefix=p, attn_bias=layer_bias)
            hidden.append(x)
        return hidden


# --------------------------------------------------------------------------------------------------------------
# The model


class Wav2Vec2Model(nn.Module):
    """A wav2vec 2.0-family encoder: waveform ``(B, T)`` to frame representations ``(B, frames, D)``.

    Args:
        cfg: the architecture.
        architecture: what the weights are (``wav2vec2``, ``hubert``, ``data2vec_audio``, ``wavlm``): reported,
            and recorded with features; the forward depends on ``cfg`` only.

    Tuning hooks: :meth:`transformer_layers` exposes the layers (adapter slots, wrapped Linears), and
    :meth:`extract_features`/:meth:`hidden_states` take per-layer prefix keys/values.
    """

    def __init__(self, cfg: Wav2Vec2Config, architecture: str = "wav2vec2") -> None:
        super().__init__()
        self.cfg = cfg
        self.architecture = architecture
        frame_layers = cfg.frame_layers
        embed = frame_layers[-1][0]
        D = cfg.encoder_embed_dim
        self.encoder_embed_dim = D
        self.downsample = math.prod(stride for _, _, stride in frame_layers)  # samples per frame (320)
        self.receptive_field = 1  # samples per frame's window (400): a shorter input gives no frame
        for _, kernel, stride in reversed(frame_layers):
            self.receptive_field = (self.receptive_field - 1) * stride + kernel
        self.feature_extractor: nn.Module = (
            FbankFeatureExtractor(cfg.fbank_mels, cfg.fbank_stack) if cfg.frontend == FrontEnd.FBANK
            else ConvFeatureExtractor(cfg.conv_layers, cfg.extractor_mode, cfg.conv_bias))
        self.layer_norm = nn.LayerNorm(embed, eps=cfg.layer_norm_eps) if cfg.feature_layer_norm else None
        self.post_extract_proj = nn.Linear(embed, D) if embed != D or cfg.always_project else None
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.mask_emb = nn.Parameter(torch.empty(D).uniform_()) if cfg.has_mask_emb else None
        self.encoder = Wav2Vec2Encoder(cfg)
        self._pretraining_roots: list[str] = []

    @property
    def num_layers(self) -> int:
        return len(self.encoder.layers)

    @property
    def frame_rate(self) -> float:
        """Frames per second of 16 kHz audio (50 for the standard front end, 25 for mHuBERT-25Hz)."""
        return 16000 / self.downsample

    def transformer_layers(self) -> nn.ModuleList:
        """The encoder's :class:`TransformerLayer` s, in order (where tuning methods attach)."""
        return self.encoder.layers

    # -- pretraining-only tensors ----------------------------------------------------------------------------------

    def keep_pretraining_tensors(self, state: Mapping[str, Tensor]) -> None:
        """Keep checkpoint tensors that feature extraction never uses as frozen buffers under their own names.

        Their top-level names must not be the model's own modules (an empty head slot is fine).
        :meth:`remove_pretraining_modules` drops them again.
        """
        for key, tensor in state.items():
            *parents, name = key.split(".")
            node: nn.Module = self
            for i, part in enumerate(parents):
                child = node._modules.get(part)
                if i == 0 and child is not None and part not in self._pretraining_roots:
                    raise ValueError(f"pretraining tensor {key!r} clashes with the model's {part!r}")
                if child is None:
                    if getattr(node, part, None) is not None:
                        raise ValueError(f"pretraining tensor {key!r} clashes with {part!r}")
                    if hasattr(node, part):  # an empty slot (a head set to None)
                        delattr(node, part)
                    child = nn.Module()
                    node.add_module(part, child)
                    if i == 0:
                        self._pretraining_roots.append(part)
                node = child
            if name not in node._buffers and getattr(node, name, None) is not None:
                raise ValueError(f"pretraining tensor {key!r} clashes with an attribute of the model")
            if hasattr(node, name) and name not in node._buffers:
                delattr(node, name)
            node.register_buffer(name, tensor.detach().clone())
            if not parents:
                self._pretraining_roots.append(name)

    def remove_pretraining_modules(self) -> None:
        """Drop what only pretraining uses (fairseq's method of the same name)."""
        for root in self._pretraining_roots:
            delattr(self, root)
        self._pretraining_roots = []

    # -- forward ---------------------------------------------------------------------------------------------------

    def frame_padding_mask(self, padding_mask: Tensor, num_frames: int) -> Tensor:
        """Downsample a sample-level padding mask ``(B, T)`` (True = padding) to frames ``(B, num_frames)``.

        ``lengths`` (wav2vec 2.0, data2vec, every HF model): the real samples of a row, ``n``, give
        ``n' = floor((n - kernel) / stride) + 1`` frames through each conv; later frames are padding.
        ``chunks`` (fairseq HuBERT): drop the ``T mod num_frames`` trailing samples, split the rest into
        ``num_frames`` equal chunks, and call a frame padding only if its whole chunk is.
        """
        B, T = padding_mask.shape
        if self.cfg.frame_padding == FramePadding.CHUNKS:
            extra = T % num_frames
            if extra:
                padding_mask = padding_mask[:, : T - extra]
            return padding_mask.reshape(B, num_frames, -1).all(dim=-1)  # (B, frames)
        lengths = (~padding_mask).sum(dim=-1)  # (B,)
        for _, kernel, stride in self.cfg.frame_layers:
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        return torch.arange(num_frames, device=padding_mask.device)[None, :] >= lengths[:, None]  # (B, frames)

    def num_frames(self, num_samples: int) -> int:
        """Frames the front end gives for ``num_samples`` samples (0 below the receptive field)."""
        return self.cfg.num_frames(num_samples)

    def frontend_features(self, source: Tensor) -> Tensor:
        """The front end, ``(B, T)`` -> ``(B, frames, C)``, with fairseq's ``feature_grad_mult``."""
        mult = self.cfg.feature_grad_mult
        if self.feature_extractor.adapted:
            # Adapters in the front end train through it: neither fairseq's no-grad shortcut (mult 0) nor its
            # gradient scaling applies to them, and the frozen convs need neither.
            return self.feature_extractor(source).transpose(1, 2)  # (B, frames, C)
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
             prefix: Sequence[LayerKV | None] | None,
             feature_mask: Callable[[Tensor, Tensor | None], Tensor] | None = None
             ) -> tuple[list[Tensor], Tensor | None]:
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
        x = self.frontend_features(source)  # (B, frames, C)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        if padding_mask is not None:
            padding_mask = self.frame_padding_mask(padding_mask.to(torch.bool), x.shape[1])  # (B, frames)
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)  # (B, frames, D)
        x = self.dropout_input(x)
        if feature_mask is not None:  # fine-tuning's span masking (fairseq apply_mask), on the projected features
            x = feature_mask(x, padding_mask)

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
            padding_mask: ``(B, T)`` bool, True at padded samples. As in the originals, padding still takes part
                in the conv front end (and in base models' GroupNorm statistics); it is masked from the positional
                conv onwards. Get the frame-level mask with :meth:`frame_padding_mask`.
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
        feature_mask: Callable[[Tensor, Tensor | None], Tensor] | None = None,
    ) -> tuple[list[Tensor], Tensor | None]:
        """Every hidden state, for a learned weighted sum of layers (HF's ``output_hidden_states``).

        ``feature_mask(x, frame_padding_mask)``, when given, rewrites the projected features ``(B, frames, D)``
        before the positional conv and the layers (fine-tuning's time and channel masking, fairseq's
        ``apply_mask``; see :mod:`speechprompt.superb.feature_mask`).

        Returns:
            ``num_layers + 1`` tensors ``(B, frames, D)``: the transformer's input (after the positional conv,
            and its LayerNorm in post-LN models), then each layer's output (no final LayerNorm); and the
            ``(B, frames)`` frame padding mask (``None`` without ``padding_mask``).
        """
        return self._run(source, padding_mask, self.num_layers, prefix, feature_mask)

    def final_features(self, hidden: Sequence[Tensor]) -> Tensor:
        """What ``extract_features(output_layer=None)`` returns, from :meth:`hidden_states`' output ``(B, F, D)``."""
        return self.encoder.layer_norm(hidden[-1]) if self.encoder.layer_norm_first else hidden[-1]


def normalize_waveform(wav: Tensor, task_cfg: Mapping[str, Any]) -> Tensor:
    """Normalise a waveform to zero mean and unit variance iff the checkpoint's task config says ``normalize``.

    Large wav2vec 2.0/HuBERT models were trained on normalised audio, base models were not. Normalise each
    utterance on its own, before padding it into a batch, as the originals' datasets do. The epsilon is fairseq's
    LayerNorm's (1e-5) unless the task config names another (``normalize_eps``: HF's feature extractor uses 1e-7).

    Args:
        wav: ``(T,)`` waveform of one utterance.
        task_cfg: the task section returned by the loaders.
    """
    if not task_cfg.get("normalize", False):
        return wav
    return F.layer_norm(wav, wav.shape, eps=float(task_cfg.get("normalize_eps", 1e-5)))
