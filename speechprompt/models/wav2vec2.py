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

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechprompt.models.transformer import LayerKV, TransformerLayer, attention_mask
from speechprompt.models.wav2vec2_blocks import (
    ConvFeatureExtractor,
    FbankFeatureExtractor,
    Fp32GroupNorm,
    Fp32LayerNorm,
    SamePad,
    TransposeLast,
    WeightNormConv1d,
    add_relative_position_gate,
    gated_position_bias,
    positional_conv,
    relative_position_buckets,
)
from speechprompt.models.wav2vec2_config import (
    ExtractorMode,
    FramePadding,
    FrontEnd,
    Wav2Vec2Config,
    conv_layers_spec,
    parse_conv_layers,
)

# The names other modules import from here (the family's public surface), wherever they are defined.
__all__ = [
    "ConvFeatureExtractor", "ExtractorMode", "FbankFeatureExtractor", "Fp32GroupNorm", "Fp32LayerNorm",
    "FramePadding", "FrontEnd", "SamePad", "TransposeLast", "Wav2Vec2Config", "Wav2Vec2Encoder", "Wav2Vec2Model",
    "WeightNormConv1d", "add_relative_position_gate", "conv_layers_spec", "gated_position_bias",
    "normalize_waveform", "parse_conv_layers", "positional_conv", "relative_position_buckets",
]


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
                prefix: Sequence[LayerKV | None] | None = None, layerdrop: float = 0.0,
                exact_padding: bool = False) -> list[Tensor]:
        """Add positions and run the layers up to ``last_layer`` (1-based; ``None`` = all). No final LayerNorm.

        Args:
            x: ``(B, frames, D)`` projected conv features.
            padding_mask: ``(B, frames)`` True at padded frames.
            prefix: per-layer projected keys/values prepended to the attention (see
                :meth:`Wav2Vec2Model.extract_features`).
            layerdrop: in training mode, skip each layer with this probability (fairseq's ``encoder_layerdrop``;
                a skipped layer passes its input on, drawn from torch's RNG).
            exact_padding: also zero the padded frames between the convs of a positional conv stack (data2vec),
                as the zero padding of an utterance alone would be; the originals let them leak into the last
                real frames.

        Returns:
            ``[layers' input, layer 1 output, ..., layer last_layer output]``, each ``(B, frames, D)``.
        """
        B, frames, _ = x.shape
        if padding_mask is not None:
            x = x.masked_fill(padding_mask[..., None], 0.0)  # padded frames must not leak through pos_conv
        if exact_padding and padding_mask is not None and len(self.pos_conv) > 1 and isinstance(
                self.pos_conv[0], nn.Sequential):
            keep = (~padding_mask)[:, None, :].to(x.dtype)  # (B, 1, frames)
            pos = x.transpose(1, 2)  # (B, D, frames)
            for block in self.pos_conv:
                pos = block(pos) * keep
            x = x + pos.transpose(1, 2)  # (B, frames, D)
        else:
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

    def frontend_features(self, source: Tensor, lengths: Tensor | None = None) -> Tensor:
        """The front end, ``(B, T)`` -> ``(B, frames, C)``, with fairseq's ``feature_grad_mult``. ``lengths``
        ``(B,)`` (real samples per row) runs a conv front end on each row's own samples (see
        :class:`ConvFeatureExtractor`)."""
        def front_end(x: Tensor) -> Tensor:
            if lengths is not None and isinstance(self.feature_extractor, ConvFeatureExtractor):
                return self.feature_extractor(x, lengths)
            return self.feature_extractor(x)

        mult = self.cfg.feature_grad_mult
        if self.feature_extractor.adapted:
            # Adapters in the front end train through it: neither fairseq's no-grad shortcut (mult 0) nor its
            # gradient scaling applies to them, and the frozen convs need neither.
            return front_end(source).transpose(1, 2)  # (B, frames, C)
        if mult <= 0:
            with torch.no_grad():
                feats = front_end(source)
        else:
            feats = front_end(source)
            if mult != 1.0 and feats.requires_grad:
                # Exactly the same value (the difference is 0); the gradient into the front end is scaled.
                feats = feats.detach() + (feats - feats.detach()) * mult
        return feats.transpose(1, 2)  # (B, frames, C)

    def _run(self, source: Tensor, padding_mask: Tensor | None, last_layer: int,
             prefix: Sequence[LayerKV | None] | None,
             feature_mask: Callable[[Tensor, Tensor | None], Tensor] | None = None,
             exact_padding: bool = False,
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
        lengths = None
        if exact_padding and padding_mask is not None:
            lengths = (~padding_mask.to(torch.bool)).sum(dim=-1)  # (B,) real samples
        x = self.frontend_features(source, lengths)  # (B, frames, C)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        if lengths is not None:
            # Each row's real frames are the ones it gives alone (the conv arithmetic on its own length), whatever
            # the checkpoint's batch rule (fairseq HuBERT's 'chunks' may count one more or one fewer).
            frames = lengths
            for _, kernel, stride in self.cfg.frame_layers:
                frames = (torch.div(frames - kernel, stride, rounding_mode="floor") + 1).clamp(min=0)
            padding_mask = torch.arange(x.shape[1], device=x.device)[None, :] >= frames[:, None]  # (B, frames)
        elif padding_mask is not None:
            padding_mask = self.frame_padding_mask(padding_mask.to(torch.bool), x.shape[1])  # (B, frames)
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)  # (B, frames, D)
        x = self.dropout_input(x)
        if feature_mask is not None:  # fine-tuning's span masking (fairseq apply_mask), on the projected features
            x = feature_mask(x, padding_mask)

        hidden = self.encoder(x, padding_mask, last_layer, prefix, exact_padding=exact_padding)
        return hidden, padding_mask

    def extract_features(
        self,
        source: Tensor,
        padding_mask: Tensor | None = None,
        output_layer: int | None = None,
        prefix: Sequence[LayerKV | None] | None = None,
        exact_padding: bool = False,
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
            exact_padding: make each real frame of a right-padded batch what its utterance gives alone (batched
                feature extraction): the conv front end runs each row on its own samples (so a GroupNorm front end
                normalises each utterance alone), the frame mask follows each row's own frame count, and a
                positional conv stack is re-masked between its convs. Off, padding behaves as in fairseq and
                transformers.

        Returns:
            ``(B, frames, D)`` with ``frames`` about ``T / 320`` for the standard front end.
        """
        if output_layer is not None and not 1 <= output_layer <= self.num_layers:
            raise ValueError(f"output_layer {output_layer} is out of range 1..{self.num_layers}")
        hidden, _ = self._run(source, padding_mask, output_layer or self.num_layers, prefix,
                              exact_padding=exact_padding)
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
        exact_padding: bool = False,
    ) -> tuple[list[Tensor], Tensor | None]:
        """Every hidden state, for a learned weighted sum of layers (HF's ``output_hidden_states``).

        ``feature_mask(x, frame_padding_mask)``, when given, rewrites the projected features ``(B, frames, D)``
        before the positional conv and the layers (fine-tuning's time and channel masking, fairseq's
        ``apply_mask``; see :mod:`speechprompt.superb.feature_mask`). ``exact_padding``: as in
        :meth:`extract_features`.

        Returns:
            ``num_layers + 1`` tensors ``(B, frames, D)``: the transformer's input (after the positional conv,
            and its LayerNorm in post-LN models), then each layer's output (no final LayerNorm); and the
            ``(B, frames)`` frame padding mask (``None`` without ``padding_mask``).
        """
        return self._run(source, padding_mask, self.num_layers, prefix, feature_mask, exact_padding)

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
