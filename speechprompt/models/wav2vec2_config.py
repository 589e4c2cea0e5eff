"""The configuration of the wav2vec 2.0 family (:class:`Wav2Vec2Config`, fairseq's field names) and the parsing of
fairseq's conv-stack specification. The models are in :mod:`speechprompt.models.wav2vec2`."""

from __future__ import annotations

import ast
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from speechprompt.config import ConfigError, from_dict, option
from speechprompt.models.transformer import ACTIVATIONS

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

