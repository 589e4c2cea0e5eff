"""Today's speech LMs: the OPT, LLaMA and Qwen2 decoder families in plain PyTorch, on the shared layer.

TWIST (OPT-350M/1.3B, LLaMA-7B) and SLAM (Qwen2.5-0.5B) are Hugging Face causal LMs over mHuBERT-25Hz units.
:class:`SpeechLM` is a :class:`~speechprompt.models.unit_lm.UnitLM` with another ``decoder``: the same
``features``/``forward`` (input and deep prompts, prefixes, ``embed_override``, the KV cache, ``return_hidden``), the
same ``transformer_layers()`` of :class:`~speechprompt.models.transformer.TransformerLayer`, so every tuning method,
task and decoder of the toolkit runs on it unchanged. What differs per family is configured, not coded:

============================  ==============  ================  ==============================================
                              OPT             LLaMA             Qwen2
============================  ==============  ================  ==============================================
positions                     learned, +2     rotary            rotary
norm                          LayerNorm       RMSNorm           RMSNorm
pre/post-LN                   ``do_layer_norm_before``  pre     pre
FFN                           fc1/fc2 (relu)  SwiGLU            SwiGLU
attention bias                all             none (or all)     q/k/v, not the output
k/v heads                     = heads         ``num_key_value_heads``  ``num_key_value_heads``
extra                         project_in/out when ``word_embed_proj_dim != hidden_size``
============================  ==============  ================  ==============================================

Positions count real tokens only (padding on either side changes nothing), as the unit LM's do; prompt and prefix
entries have no position (their keys are not rotated).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from speechprompt.config import ConfigError, option
from speechprompt.models.transformer import ACTIVATIONS, Dropout, RMSNorm, TransformerLayer
from speechprompt.models.unit_lm import UnitLM
from speechprompt.models.unit_vocab import UnitVocab

FAMILIES = ("opt", "llama", "qwen2")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclass
class SpeechLMConfig:
    """Architecture of a Hugging Face decoder LM (read from its ``config.json`` by :mod:`speechprompt.models.
    hf_decoders`); field names follow the toolkit's :class:`~speechprompt.models.unit_lm.UnitLMConfig`."""

    family: str = option("qwen2", help=f"decoder family, one of {FAMILIES}")
    vocab_size: int = option(502, help="rows of the token embedding (HF vocab_size)")
    embed_dim: int = option(896, help="model width d (hidden_size)")
    ffn_dim: int = option(4864, help="FFN hidden size (intermediate_size; OPT: ffn_dim)")
    layers: int = option(24, help="transformer layers (num_hidden_layers)")
    heads: int = option(14, help="query heads (num_attention_heads)")
    kv_heads: int = option(2, help="key/value heads (num_key_value_heads; < heads: grouped-query attention)")
    head_dim: int = option(64, help="width of one head (head_dim, else hidden_size / heads)")
    normalize_before: bool = option(True, help="pre-LN layers (OPT: do_layer_norm_before)")
    final_layer_norm: bool = option(True, help="a norm after the last layer")
    norm: str = option("rms", help="'rms' (RMSNorm) or 'layer' (LayerNorm)")
    norm_eps: float = option(1e-6, help="epsilon of every norm (rms_norm_eps; OPT 1e-5)")
    ffn: str = option("swiglu", help="'swiglu' (gate/up/down) or 'mlp' (fc1/fc2)")
    activation: str = option("silu", help=f"FFN activation (hidden_act), one of {sorted(ACTIVATIONS)}")
    qkv_bias: bool = option(True, help="q/k/v projections have biases")
    out_bias: bool = option(False, help="the attention output projection has a bias")
    ffn_bias: bool = option(False, help="the FFN projections have biases")
    rope_theta: float = option(10000.0, help="rotary base (rope_theta)")
    rope_scaling: dict[str, Any] = option({}, help="HF rope_scaling: {} or rope_type linear | dynamic | llama3")
    max_positions: int = option(32768, help="max_position_embeddings (OPT: rows of the learned table, less 2)")
    learned_pos: bool = option(False, help="OPT's learned positions (offset 2) instead of rotary")
    word_embed_dim: int = option(0, help="OPT word_embed_proj_dim when != hidden_size (project_in/out); 0: none")
    tie_embeddings: bool = option(True, help="the output projection is the input embedding (tie_word_embeddings)")
    padding_idx: int = option(0, help="the padding token id")
    dropout: float = option(0.0, help="dropout on residual branches (OPT: dropout)")
    attention_dropout: float = option(0.0, help="dropout on attention weights")
    activation_dropout: float = option(0.0, help="dropout after the FFN activation")

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"SpeechLMConfig.family {self.family!r} is not one of {FAMILIES}")
        if self.norm not in ("rms", "layer") or self.ffn not in ("swiglu", "mlp"):
            raise ConfigError(f"SpeechLMConfig: norm {self.norm!r} / ffn {self.ffn!r} not supported")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"SpeechLMConfig.activation {self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        if self.heads % self.kv_heads:
            raise ConfigError(f"SpeechLMConfig: {self.heads} heads are not a multiple of {self.kv_heads} k/v heads")
        if not 0 <= self.padding_idx < self.vocab_size:
            raise ConfigError(f"SpeechLMConfig.padding_idx {self.padding_idx} is outside the vocabulary")
        if not self.learned_pos:
            rope_type(self.rope_scaling)  # refuses what it cannot compute
            if self.head_dim % 2:
                raise ConfigError(f"rotary positions need an even head_dim, got {self.head_dim}")


def rope_type(scaling: Mapping[str, Any] | None) -> str:
    """The rotary scaling type of a config's ``rope_scaling`` (``default`` when none); others are refused."""
    if not scaling:
        return "default"
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ConfigError(f"rope_scaling type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if kind in ("linear", "dynamic", "llama3") and not isinstance(scaling.get("factor"), (int, float)):
        raise ConfigError(f"rope_scaling type {kind!r} needs a numeric 'factor'")
    return str(kind)


class RotaryPositions(nn.Module):
    """Rotary ``(cos, sin)`` tables for positions ``(B, T)`` -> ``(B, T, head_dim)`` each, float32.

    Frequencies ``theta^(-2i/hd)``, scaled as the config says: ``linear`` divides positions by ``factor``;
    ``llama3`` rescales low frequencies by ``factor`` and blends the middle band (Llama 3.1); ``dynamic`` (NTK)
    raises the base once a call reaches past ``max_positions``, as its reference recomputes it per call.
    """

    def __init__(self, cfg: SpeechLMConfig) -> None:
        super().__init__()
        self.head_dim, self.theta, self.max_positions = cfg.head_dim, cfg.rope_theta, cfg.max_positions
        self.scaling = dict(cfg.rope_scaling)
        self.kind = rope_type(self.scaling)
        self.register_buffer("inv_freq", self._inv_freq(self.theta), persistent=False)

    def _inv_freq(self, base: float) -> Tensor:
        hd = self.head_dim
        inv = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))  # (hd/2,)
        s = self.scaling
        if self.kind == "linear":
            inv = inv / float(s["factor"])
        elif self.kind == "llama3":
            factor, old = float(s["factor"]), float(s.get("original_max_position_embeddings", 8192))
            low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > old / low, inv / factor, inv)  # long wavelengths: slowed down
            smooth = (old / wavelen - low) / (high - low)
            blended = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= old / high) & (wavelen <= old / low)
            inv = torch.where(medium, blended, scaled)
        return inv

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        inv = self.inv_freq
        if self.kind == "dynamic":
            seq_len = int(positions.max()) + 1 if positions.numel() else 0
            if seq_len > self.max_positions:
                factor, hd = float(self.scaling["factor"]), self.head_dim
                base = self.theta * ((factor * seq_len / self.max_positions) - (factor - 1)) ** (hd / (hd - 2))
                inv = self._inv_freq(base).to(positions.device)
        angles = positions.float()[..., None] * inv.float()  # (B, T, hd/2)
        emb = torch.cat([angles, angles], dim=-1)  # (B, T, hd)
        return emb.cos(), emb.sin()


class SpeechLMDecoder(nn.Module):
    """The decoder of one family, named as the toolkit names the unit LM's (see :mod:`speechprompt.models.
    hf_decoders` for the HF key table): ``embed_tokens``, ``embed_positions`` (OPT), ``project_in``/``project_out``
    (OPT when ``word_embed_dim`` differs; the unit LM's maps of the same names, which :meth:`UnitLM.features`
    applies), ``layers``, ``layer_norm`` (the final norm), ``output_projection``."""

    def __init__(self, cfg: SpeechLMConfig) -> None:
        super().__init__()
        d, e = cfg.embed_dim, cfg.word_embed_dim or cfg.embed_dim
        self.padding_idx = cfg.padding_idx
        self.embed_scale = 1.0
        self.embed_tokens = nn.Embedding(cfg.vocab_size, e, padding_idx=cfg.padding_idx)
        # OPT: a table of max_positions + 2 rows, as OPT offsets every position by 2.
        self.embed_positions = nn.Embedding(cfg.max_positions + 2, d) if cfg.learned_pos else None
        self.rotary = None if cfg.learned_pos else RotaryPositions(cfg)
        self.project_in = nn.Linear(e, d, bias=False) if e != d else None
        self.layers = nn.ModuleList(
            TransformerLayer(d, cfg.ffn_dim, cfg.heads, cfg.normalize_before, cfg.activation, cfg.dropout,
                             cfg.attention_dropout, cfg.activation_dropout, layer_norm_eps=cfg.norm_eps, norm=cfg.norm,
                             ffn=cfg.ffn, num_kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, qkv_bias=cfg.qkv_bias,
                             out_bias=cfg.out_bias, ffn_bias=cfg.ffn_bias)
            for _ in range(cfg.layers)
        )
        norm = (lambda: RMSNorm(d, cfg.norm_eps)) if cfg.norm == "rms" else (lambda: nn.LayerNorm(d, eps=cfg.norm_eps))
        self.layer_norm = norm() if cfg.final_layer_norm else None
        self.project_out = nn.Linear(d, e, bias=False) if e != d else None
        self.output_projection = nn.Linear(e, cfg.vocab_size, bias=False)
        self.dropout = Dropout(cfg.dropout)
        self._init_weights()
        if cfg.tie_embeddings:
            self.output_projection.weight = self.embed_tokens.weight

    def _init_weights(self, std: float = 0.02) -> None:
        """The families' own initialisation (their ``initializer_range``, 0.02): weights N(0, std^2), biases 0.
        Loading replaces every tensor; this matters for models built from a config (tests, benchmarks), whose
        logits would otherwise be those of PyTorch's unit-variance embeddings."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)


class SpeechLM(UnitLM):
    """An OPT/LLaMA/Qwen2 causal LM over unit tokens, with the unit LM's interface and hooks.

    Shapes as :class:`UnitLM`: tokens ``(B, T)`` -> logits ``(B, T, V)``, hidden ``(B, T, D_out)`` (after OPT's
    ``project_out`` where it has one, as HF's last hidden state: ``word_embed_proj_dim`` wide, else ``D``).
    ``unit_vocab`` says which tokens are units (set by the loader).
    """

    cfg: SpeechLMConfig

    def __init__(self, cfg: SpeechLMConfig, unit_vocab: UnitVocab | None = None) -> None:
        super().__init__(cfg)  # type: ignore[arg-type]
        self.unit_vocab = unit_vocab

    def _build_decoder(self, cfg: Any) -> nn.Module:
        return SpeechLMDecoder(cfg)

    def _token_states(
        self, tokens: Tensor, offset: Tensor | None, embed_override: Mapping[int, Tensor] | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        dec = self.decoder
        real = tokens.ne(self.padding_idx).long()
        positions = (torch.cumsum(real, dim=1) - 1).clamp_(min=0)  # (B, T): 0-based count of real tokens
        if offset is not None:
            positions = positions + offset[:, None]
        x = self.input_embeddings(tokens, embed_override)
        if dec.embed_positions is not None:
            if positions.numel() and int(positions.max()) + 2 >= dec.embed_positions.num_embeddings:
                raise ValueError(f"sequence of {int(positions.max()) + 1} tokens is longer than the "
                                 f"{dec.embed_positions.num_embeddings - 2} learned positions")
            x = x + dec.embed_positions(positions + 2).to(x.dtype)
            return x, None
        return x, dec.rotary(positions)


# The published speech LMs' shapes over slamkit's 500-unit vocabulary (502 tokens), for counts and benchmarks
# (random weights: the real ones load from their directories). TWIST (Hassid et al. 2023) warm-starts from OPT-350M,
# OPT-1.3B and LLaMA-7B; SLAM (Maimon et al. 2025) from Qwen2.5-0.5B.
_OPT = dict(family="opt", norm="layer", norm_eps=1e-5, ffn="mlp", activation="relu", qkv_bias=True, out_bias=True,
            ffn_bias=True, learned_pos=True, max_positions=2048)
PUBLISHED_SHAPES: dict[str, dict[str, Any]] = {
    "twist_350m": dict(_OPT, vocab_size=502, embed_dim=1024, word_embed_dim=512, ffn_dim=4096, layers=24, heads=16,
                       kv_heads=16, head_dim=64, normalize_before=False, final_layer_norm=False),
    "twist_1.3b": dict(_OPT, vocab_size=502, embed_dim=2048, ffn_dim=8192, layers=24, heads=32, kv_heads=32,
                       head_dim=64),
    "twist_7b": dict(family="llama", vocab_size=502, embed_dim=4096, ffn_dim=11008, layers=32, heads=32, kv_heads=32,
                     head_dim=128, qkv_bias=False, tie_embeddings=False, max_positions=2048),
    "slam_qwen2.5_0.5b": dict(family="qwen2", vocab_size=502, embed_dim=896, ffn_dim=4864, layers=24, heads=14,
                              kv_heads=2, head_dim=64, rope_theta=1000000.0),
}


def num_parameters(cfg: SpeechLMConfig) -> int:
    """Parameters of the architecture (tied weights counted once), without building it."""
    with torch.device("meta"):
        model = SpeechLM(dataclasses.replace(cfg))
    return sum(p.numel() for p in model.parameters())


__all__ = ["FAMILIES", "PUBLISHED_SHAPES", "RotaryPositions", "SpeechLM", "SpeechLMConfig", "SpeechLMDecoder",
           "num_parameters", "rope_type"]
