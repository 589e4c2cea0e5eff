"""The Audio Spectrogram Transformer (AST; Gong et al., 2021) in plain PyTorch, on the shared transformer layer.

AST is a ViT over a Kaldi log-mel spectrogram: 16x16 patches of a ``(max_length, num_mel_bins)`` fbank (overlapping:
strides of 10 in both axes by default), a class and a distillation token in front, learned position embeddings, and
pre-LN transformer layers with a final LayerNorm. Its front end runs inside this model, so it takes 16 kHz
waveforms ``(B, T)`` like every other encoder of the toolkit, and the tuning methods attach to its layers unchanged.

Front end, as ``ASTFeatureExtractor``: Kaldi fbank (25 ms Hann window, 10 ms hop, no dither, ``num_mel_bins``
filters) of each utterance's real samples, zero-padded or truncated to ``max_length`` frames, then normalised as
``(fbank - mean) / (2 * std)`` with the statistics of the training set (AudioSet: -4.27, 4.57 for 10 s clips,
``max_length`` 1024; Speech Commands: -6.85, 5.57 for 1 s keyword clips, ``max_length`` 128). The padded frames are
normalised too and every token attends to every other: AST has no padding mask, so :meth:`ASTModel.hidden_states`
reports no padded token.

AST exists only as Hugging Face directories (and the original repo), so the names here are our own, chosen to
match the wav2vec 2.0-family encoders; :mod:`speechprompt.models.hf_keys` maps the Hugging Face names::

    patch_embed.proj         Conv2d(1, D, patch, stride=(frequency_stride, time_stride))
    cls_token, dist_token    (1, 1, D) each
    pos_embed                (1, 2 + patches, D)
    encoder.layers.{i}       pre-LN :class:`~speechprompt.models.transformer.TransformerLayer` (LayerNorm eps 1e-12)
    encoder.layer_norm       the final LayerNorm
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from speechprompt.audio import SAMPLE_RATE, fbank
from speechprompt.config import ConfigError, option
from speechprompt.models.transformer import ACTIVATIONS, LayerKV, TransformerLayer

FBANK_FRAME = 400  # samples in one 25 ms fbank frame at 16 kHz: a shorter input has no frame


@dataclass
class ASTConfig:
    """Architecture and front end of an AST. Field names are Hugging Face's (``ASTConfig`` and, for the front end,
    ``ASTFeatureExtractor``'s ``mean``/``std``/``do_normalize``)."""

    hidden_size: int = option(768, help="transformer width D")
    num_hidden_layers: int = option(12, help="transformer layers")
    num_attention_heads: int = option(12, help="attention heads")
    intermediate_size: int = option(3072, help="FFN hidden size")
    hidden_act: str = option("gelu", help=f"FFN activation, one of {sorted(ACTIVATIONS)}")
    hidden_dropout_prob: float = option(0.0, help="dropout on embeddings and sublayer outputs (training only)")
    attention_probs_dropout_prob: float = option(0.0, help="dropout on attention weights (training only)")
    layer_norm_eps: float = option(1e-12, help="LayerNorm epsilon")
    patch_size: int = option(16, help="square patch size, in fbank frames and mel bins")
    frequency_stride: int = option(10, help="patch stride along mel bins")
    time_stride: int = option(10, help="patch stride along frames")
    max_length: int = option(1024, help="fbank frames per clip (1024 = 10.24 s; 128 for keyword clips)")
    num_mel_bins: int = option(128, help="mel filters of the fbank")
    mean: float = option(-4.2677393, help="fbank mean of the training set (AudioSet's by default)")
    std: float = option(4.5689974, help="fbank standard deviation of the training set")
    do_normalize: bool = option(True, help="normalise the fbank as (x - mean) / (2 std)")

    def __post_init__(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                              f"{self.num_attention_heads}")
        for name in ("num_hidden_layers", "patch_size", "frequency_stride", "time_stride"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.num_mel_bins < self.patch_size or self.max_length < self.patch_size:
            raise ConfigError(f"num_mel_bins {self.num_mel_bins} and max_length {self.max_length} must be at least "
                              f"patch_size {self.patch_size}")
        if self.std <= 0:
            raise ConfigError(f"std must be positive, got {self.std}")

    @property
    def patch_grid(self) -> tuple[int, int]:
        """Patches along (mel bins, frames)."""
        f = (self.num_mel_bins - self.patch_size) // self.frequency_stride + 1
        t = (self.max_length - self.patch_size) // self.time_stride + 1
        return f, t

    @classmethod
    def audioset(cls) -> ASTConfig:
        """``MIT/ast-finetuned-audioset-10-10-0.4593``: 10 s clips, 12 x 101 = 1212 patches."""
        return cls()

    @classmethod
    def speech_commands(cls) -> ASTConfig:
        """``MIT/ast-finetuned-speech-commands-v2``: 1 s keyword clips (128 frames), its own fbank statistics."""
        return cls(max_length=128, mean=-6.845978, std=5.5654526)


class PatchEmbed(nn.Module):
    """Spectrogram ``(B, max_length, mel)`` -> patch embeddings ``(B, patches, D)``, frequency-major."""

    def __init__(self, cfg: ASTConfig) -> None:
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(1, cfg.hidden_size, (p, p), stride=(cfg.frequency_stride, cfg.time_stride))

    def forward(self, spec: Tensor) -> Tensor:
        x = spec[:, None].transpose(2, 3)  # (B, 1, mel, frames): AST puts frequency first
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, f * t, D)


class ASTEncoder(nn.Module):
    """The pre-LN layers and the final LayerNorm (a container: :class:`ASTModel` runs them)."""

    layer_norm_first = True

    def __init__(self, cfg: ASTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerLayer(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, normalize_before=True,
                             activation=cfg.hidden_act, dropout=cfg.hidden_dropout_prob,
                             attention_dropout=cfg.attention_probs_dropout_prob, layer_norm_eps=cfg.layer_norm_eps)
            for _ in range(cfg.num_hidden_layers)
        )
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class ASTModel(nn.Module):
    """AST: 16 kHz waveform ``(B, T)`` to token representations ``(B, 2 + patches, D)`` (class, distillation, then
    the patches in frequency-major order).

    The interface is the wav2vec 2.0-family encoders' (:class:`~speechprompt.models.wav2vec2.Wav2Vec2Model`), so
    SUPERB heads, feature readers and every tuning method use it unchanged.
    """

    architecture = "ast"
    receptive_field = FBANK_FRAME
    frame_rate = None  # tokens are patches of a fixed-length spectrogram, not frames in time

    def __init__(self, cfg: ASTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.encoder_embed_dim = D
        f, t = cfg.patch_grid
        self.num_tokens = 2 + f * t
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, D))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.encoder = ASTEncoder(cfg)

    @property
    def num_layers(self) -> int:
        return len(self.encoder.layers)

    def transformer_layers(self) -> nn.ModuleList:
        """The encoder's :class:`TransformerLayer` s, in order (where tuning methods attach)."""
        return self.encoder.layers

    def remove_pretraining_modules(self) -> None:
        """Nothing to remove: an AST checkpoint holds no pretraining-only tensors."""

    def frame_padding_mask(self, padding_mask: Tensor, num_frames: int) -> Tensor:
        """No token is padding (see the module docstring): all False, ``(B, num_frames)``."""
        return torch.zeros(padding_mask.shape[0], num_frames, dtype=torch.bool, device=padding_mask.device)

    def spectrogram(self, source: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """AST's front end: ``(B, T)`` waveforms -> normalised fbank ``(B, max_length, num_mel_bins)``.

        Each row's fbank covers its real samples only (those not marked in ``padding_mask``), so a batch gives
        what each utterance gives alone.
        """
        cfg = self.cfg
        lengths = (~padding_mask).sum(-1).tolist() if padding_mask is not None else [source.shape[1]] * len(source)
        specs = []
        for wav, n in zip(source, lengths):
            # float64, as the reference front end computes it; the model then runs in its own dtype.
            spec = fbank(wav[:n].double(), SAMPLE_RATE, n_mels=cfg.num_mel_bins, window="hanning")  # (frames, M)
            spec = spec[: cfg.max_length]
            if spec.shape[0] < cfg.max_length:  # zero frames, normalised below like the rest
                spec = torch.cat([spec, spec.new_zeros(cfg.max_length - spec.shape[0], cfg.num_mel_bins)])
            specs.append(spec)
        spec = torch.stack(specs)  # (B, max_length, M)
        if cfg.do_normalize:
            spec = (spec - cfg.mean) / (cfg.std * 2)
        return spec.to(self.pos_embed.dtype)

    def embed(self, spec: Tensor) -> Tensor:
        """Normalised fbank ``(B, max_length, M)`` -> the layers' input ``(B, 2 + patches, D)``."""
        x = self.patch_embed(spec)  # (B, patches, D)
        B = x.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.dist_token.expand(B, -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embed)

    def _run(self, source: Tensor, padding_mask: Tensor | None, last_layer: int,
             prefix: Sequence[LayerKV | None] | None) -> tuple[list[Tensor], Tensor | None]:
        if source.dim() != 2:
            raise ValueError(f"source must be (B, T) samples, got shape {tuple(source.shape)}")
        if prefix is not None and len(prefix) != self.num_layers:
            raise ValueError(f"prefix has {len(prefix)} entries; the encoder has {self.num_layers} layers")
        if source.shape[1] < self.receptive_field:
            raise ValueError(f"input of {source.shape[1]} samples is shorter than one fbank frame "
                             f"({self.receptive_field} samples)")
        if padding_mask is not None:
            padding_mask = padding_mask.to(torch.bool)
        x = self.embed(self.spectrogram(source, padding_mask))  # (B, N, D)
        hidden = [x]
        for i, layer in enumerate(self.encoder.layers[:last_layer]):
            x = layer(x, prefix=prefix[i] if prefix is not None else None)  # no mask: every token sees every other
            hidden.append(x)
        frame_mask = self.frame_padding_mask(padding_mask, x.shape[1]) if padding_mask is not None else None
        return hidden, frame_mask

    def extract_features(
        self,
        source: Tensor,
        padding_mask: Tensor | None = None,
        output_layer: int | None = None,
        prefix: Sequence[LayerKV | None] | None = None,
    ) -> Tensor:
        """Token representations from one layer's output (``None``: all layers and the final LayerNorm, HF's
        ``last_hidden_state``). ``(B, 2 + patches, D)``; arguments as the wav2vec 2.0-family encoders'."""
        if output_layer is not None and not 1 <= output_layer <= self.num_layers:
            raise ValueError(f"output_layer {output_layer} is out of range 1..{self.num_layers}")
        hidden, _ = self._run(source, padding_mask, output_layer or self.num_layers, prefix)
        return self.encoder.layer_norm(hidden[-1]) if output_layer is None else hidden[-1]

    def hidden_states(
        self,
        source: Tensor,
        padding_mask: Tensor | None = None,
        prefix: Sequence[LayerKV | None] | None = None,
    ) -> tuple[list[Tensor], Tensor | None]:
        """The embeddings and every layer's output (no final LayerNorm), ``num_layers + 1`` x ``(B, N, D)``, and
        an all-False ``(B, N)`` token padding mask (``None`` without ``padding_mask``)."""
        return self._run(source, padding_mask, self.num_layers, prefix)

    def final_features(self, hidden: Sequence[Tensor]) -> Tensor:
        """``extract_features(output_layer=None)`` from :meth:`hidden_states`' output: the final LayerNorm."""
        return self.encoder.layer_norm(hidden[-1])
