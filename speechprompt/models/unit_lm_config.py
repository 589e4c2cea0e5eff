"""The unit LM's configuration: :class:`UnitLMConfig` (our field names, with the translation from and to fairseq's
``transformer_lm`` configs, as fairseq fills in each registered architecture's defaults) and the named sizes. The
model is :mod:`speechprompt.models.unit_lm`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from speechprompt.config import ConfigError, from_dict, option
from speechprompt.errors import CheckpointError
from speechprompt.models.transformer import ACTIVATIONS

# fairseq's DEFAULT_MAX_TARGET_POSITIONS (used when neither max_target_positions nor tokens_per_sample is set).
_FAIRSEQ_DEFAULT_MAX_POSITIONS = 1024


# --------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class UnitLMConfig:
    """Architecture of a decoder-only unit LM (fairseq ``transformer_lm`` family)."""

    vocab_size: int = option(104, help="dictionary size including the 4 specials (100 units -> 104)")
    embed_dim: int = option(1024, help="model width d (fairseq decoder_embed_dim)")
    ffn_dim: int = option(4096, help="hidden size of the feed-forward blocks (decoder_ffn_embed_dim)")
    layers: int = option(12, help="number of transformer layers (decoder_layers)")
    heads: int = option(16, help="attention heads per layer (decoder_attention_heads)")
    normalize_before: bool = option(True, help="pre-LayerNorm layers (decoder_normalize_before)")
    final_layer_norm: bool = option(
        True, help="LayerNorm after the last layer (fairseq adds it only to pre-LN models: not no_decoder_final_norm)"
    )
    learned_pos: bool = option(False, help="learned positional embeddings instead of sinusoidal (decoder_learned_pos)")
    max_positions: int = option(
        3072, help="longest token sequence (max_target_positions); sizes the table of learned positions"
    )
    tie_embeddings: bool = option(
        True, help="output projection shares the input embedding (share_decoder_input_output_embed)"
    )
    scale_embedding: bool = option(True, help="multiply token embeddings by sqrt(d) (not no_scale_embedding)")
    activation: str = option("relu", help=f"FFN activation, one of {sorted(ACTIVATIONS)}")
    dropout: float = option(0.1, help="dropout on embeddings and residual branches (active only in train mode)")
    attention_dropout: float = option(0.1, help="dropout on attention weights")
    activation_dropout: float = option(0.0, help="dropout after the FFN activation")
    padding_idx: int = option(1, help="id of <pad> in the dictionary (fairseq: 1)")
    input_dim: int | None = option(
        None, help="width of the token embedding table (decoder_input_dim); when it differs from embed_dim a "
        "bias-free decoder.project_in (fairseq's project_in_dim) maps it to embed_dim after scaling, before positions. "
        "None = embed_dim")
    output_dim: int | None = option(
        None, help="width the output projection reads (decoder_output_dim); when it differs from embed_dim a "
        "bias-free decoder.project_out (fairseq's project_out_dim) maps the final states to it. None = embed_dim")

    def __post_init__(self) -> None:
        for name in ("vocab_size", "embed_dim", "ffn_dim", "layers", "heads", "max_positions"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"UnitLMConfig.{name} must be positive, got {getattr(self, name)}")
        if self.embed_dim % self.heads:
            raise ConfigError(f"UnitLMConfig: embed_dim {self.embed_dim} is not divisible by heads {self.heads}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"UnitLMConfig.activation {self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        if not 0 <= self.padding_idx < self.vocab_size:
            raise ConfigError(f"UnitLMConfig.padding_idx {self.padding_idx} is outside the vocabulary")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"UnitLMConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.learned_pos and self.embed_dim < 4:
            raise ConfigError("UnitLMConfig: sinusoidal positions need embed_dim >= 4")
        for name in ("input_dim", "output_dim"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"UnitLMConfig.{name} must be positive or None, got {getattr(self, name)}")
        if self.tie_embeddings and self.token_dim != self.hidden_out_dim:
            # The shared table is (V, input_dim) and the output projection reads output_dim features.
            raise ConfigError(f"UnitLMConfig: tied embeddings need input_dim == output_dim, got {self.token_dim} "
                              f"and {self.hidden_out_dim}")

    @property
    def token_dim(self) -> int:
        """Width of the token embedding table (``input_dim``, or ``embed_dim`` without an input projection)."""
        return self.embed_dim if self.input_dim is None else self.input_dim

    @property
    def hidden_out_dim(self) -> int:
        """Width of the final states the output projection reads (``output_dim``, or ``embed_dim``)."""
        return self.embed_dim if self.output_dim is None else self.output_dim

    @classmethod
    def named(cls, name: str, **overrides: Any) -> UnitLMConfig:
        """A registered architecture (see :data:`NAMED_CONFIGS`), with optional field overrides."""
        if name not in NAMED_CONFIGS:
            raise ConfigError(f"unknown unit LM config {name!r}; known: {', '.join(NAMED_CONFIGS)}")
        return from_dict(cls, {**NAMED_CONFIGS[name], **overrides})

    @classmethod
    def from_fairseq(cls, cfg: Mapping[str, Any]) -> UnitLMConfig:
        """Read fairseq's model config: a checkpoint's whole ``cfg`` (with ``model`` and ``task`` sections), its
        ``cfg["model"]`` (new style), or a legacy flat ``args`` dict. Absent fields take the defaults of the named
        ``arch`` (``transformer_lm_big`` etc.) as fairseq itself would fill them in."""
        root = dict(cfg)
        model = dict(root["model"]) if isinstance(root.get("model"), Mapping) else root
        model = {k: _resolve_interpolation(v, root) for k, v in model.items()}
        arch = model.get("_name") or model.get("arch") or "transformer_lm"
        if arch not in _FAIRSEQ_ARCH_DEFAULTS:
            raise CheckpointError(
                f"unsupported fairseq architecture {arch!r}; supported: {', '.join(_FAIRSEQ_ARCH_DEFAULTS)}"
            )
        m = {**_FAIRSEQ_ARCH_DEFAULTS[arch], **{k: v for k, v in model.items() if v is not None}}
        if arch != "transformer_lm":
            # fairseq's base_lm_architecture forces pre-LN for every registered transformer_lm_* arch.
            m["decoder_normalize_before"] = True
        if "decoder_final_norm" in m:  # an older spelling
            m["no_decoder_final_norm"] = not m["decoder_final_norm"]
        for flag in _UNSUPPORTED_FAIRSEQ_FLAGS:
            if m.get(flag):
                raise CheckpointError(f"fairseq option {flag}={m[flag]!r} is not supported by UnitLM")
        d = int(m["decoder_embed_dim"])
        # Absent (checkpoints of fairseq < 0.10): base_lm_architecture sets both to decoder_embed_dim. Present, as
        # every config that went through fairseq's dataclass has them, they keep their value, which is 512 for a
        # `fairseq-train --decoder-embed-dim 64` run: fairseq then adds the project_in_dim/project_out_dim linears.
        input_dim, output_dim = (int(m[key]) if m.get(key) is not None else d
                                 for key in ("decoder_input_dim", "decoder_output_dim"))
        max_pos = m.get("max_target_positions") or m.get("tokens_per_sample") or _FAIRSEQ_DEFAULT_MAX_POSITIONS
        activation_dropout = float(m.get("activation_dropout") or 0.0) or float(m.get("relu_dropout") or 0.0)
        activation = str(m.get("activation_fn", "relu"))
        vocab_size = int(m["vocab_size"]) if "vocab_size" in m else NAMED_CONFIGS["gslm_big"]["vocab_size"]
        return cls(
            vocab_size=vocab_size,
            embed_dim=d,
            ffn_dim=int(m["decoder_ffn_embed_dim"]),
            layers=int(m["decoder_layers"]),
            heads=int(m["decoder_attention_heads"]),
            normalize_before=bool(m["decoder_normalize_before"]),
            final_layer_norm=bool(m["decoder_normalize_before"]) and not bool(m.get("no_decoder_final_norm")),
            learned_pos=bool(m.get("decoder_learned_pos", False)),
            max_positions=int(max_pos),
            tie_embeddings=bool(m.get("share_decoder_input_output_embed", False)),
            scale_embedding=not bool(m.get("no_scale_embedding", False)),
            activation=_FAIRSEQ_ACTIVATION_ALIASES.get(activation, activation),
            dropout=float(m.get("dropout", 0.1)),
            attention_dropout=float(m.get("attention_dropout", 0.0)),
            activation_dropout=activation_dropout,
            input_dim=None if input_dim == d else input_dim,
            output_dim=None if output_dim == d else output_dim,
        )

    def to_fairseq_cfg(self) -> dict[str, Any]:
        """fairseq's ``cfg["model"]`` for this architecture (``_name: transformer_lm``, every field explicit), from
        which fairseq rebuilds the same model. ``vocab_size`` is not a fairseq field: fairseq takes it from
        ``dict.txt``."""
        if self.final_layer_norm and not self.normalize_before:
            raise ConfigError("fairseq cannot express a final LayerNorm on a post-LN model")
        if self.padding_idx != 1:
            raise ConfigError("fairseq dictionaries always have <pad> at index 1")
        return {
            "_name": "transformer_lm",
            "activation_fn": self.activation,
            "dropout": self.dropout,
            "attention_dropout": self.attention_dropout,
            "activation_dropout": self.activation_dropout,
            "relu_dropout": 0.0,
            "decoder_embed_dim": self.embed_dim,
            "decoder_output_dim": self.hidden_out_dim,
            "decoder_input_dim": self.token_dim,
            "decoder_ffn_embed_dim": self.ffn_dim,
            "decoder_layers": self.layers,
            "decoder_attention_heads": self.heads,
            "decoder_normalize_before": self.normalize_before,
            "no_decoder_final_norm": self.normalize_before and not self.final_layer_norm,
            "adaptive_softmax_cutoff": None,
            "adaptive_softmax_dropout": 0.0,
            "adaptive_softmax_factor": 4.0,
            "no_token_positional_embeddings": False,
            "share_decoder_input_output_embed": self.tie_embeddings,
            "character_embeddings": False,
            "adaptive_input": False,
            "tie_adaptive_weights": False,
            "tie_adaptive_proj": False,
            "decoder_learned_pos": self.learned_pos,
            "layernorm_embedding": False,
            "no_scale_embedding": not self.scale_embedding,
            "checkpoint_activations": False,
            "offload_activations": False,
            "decoder_layerdrop": 0.0,
            "decoder_layers_to_keep": None,
            "quant_noise_pq": 0.0,
            "quant_noise_pq_block_size": 8,
            "quant_noise_scalar": 0.0,
            "base_layers": 0,
            "base_sublayers": 1,
            "base_shuffle": 1,
            "scale_fc": False,
            "scale_attn": False,
            "scale_heads": False,
            "scale_resids": False,
            "add_bos_token": False,
            "tokens_per_sample": self.max_positions,
            "max_target_positions": self.max_positions,
            "tpu": False,
        }


# name -> field values. `gslm_big` is GSLM's unit LM (fairseq transformer_lm_big, 151,263,232 parameters with 100
# units); `small` pretrains on a CPU in minutes; `tiny` is for tests.
NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    "gslm_big": dict(vocab_size=104, embed_dim=1024, ffn_dim=4096, layers=12, heads=16, max_positions=3072,
                     dropout=0.1, attention_dropout=0.1),
    "small": dict(vocab_size=104, embed_dim=256, ffn_dim=1024, layers=6, heads=4, max_positions=1024,
                  dropout=0.1, attention_dropout=0.1),
    # The embedded default's LM: pretrains on ~50k units in a few minutes on 2 CPU cores.
    "demo": dict(vocab_size=104, embed_dim=128, ffn_dim=512, layers=4, heads=4, max_positions=1024,
                 dropout=0.1, attention_dropout=0.1),
    "tiny": dict(vocab_size=104, embed_dim=64, ffn_dim=128, layers=2, heads=4, max_positions=256,
                 dropout=0.0, attention_dropout=0.0),
}

# fairseq defaults per architecture, as base_lm_architecture / transformer_lm_big and the
# TransformerLanguageModelConfig dataclass fill them in.
_FAIRSEQ_BASE = dict(
    decoder_embed_dim=512, decoder_ffn_embed_dim=2048, decoder_layers=6, decoder_attention_heads=8,
    decoder_normalize_before=False, dropout=0.1, attention_dropout=0.0, activation_fn="relu",
)
_FAIRSEQ_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "transformer_lm": _FAIRSEQ_BASE,
    "transformer_lm_big": {**_FAIRSEQ_BASE, "decoder_embed_dim": 1024, "decoder_ffn_embed_dim": 4096,
                           "decoder_layers": 12, "decoder_attention_heads": 16},
    "transformer_lm_gpt": {**_FAIRSEQ_BASE, "decoder_embed_dim": 768, "decoder_ffn_embed_dim": 3072,
                           "decoder_layers": 12, "decoder_attention_heads": 12, "attention_dropout": 0.1,
                           "activation_fn": "gelu"},
}
_FAIRSEQ_ACTIVATION_ALIASES = {"gelu_fast": "gelu_accurate"}
_UNSUPPORTED_FAIRSEQ_FLAGS = (
    "adaptive_input", "character_embeddings", "adaptive_softmax_cutoff", "layernorm_embedding",
    "no_token_positional_embeddings", "scale_fc", "scale_attn", "scale_heads", "scale_resids", "base_layers",
)
_INTERPOLATION = re.compile(r"^\$\{([\w.]+)\}$")


def _resolve_interpolation(value: Any, root: Mapping[str, Any]) -> Any:
    """Resolve an omegaconf ``${task.tokens_per_sample}`` left unresolved in a saved cfg (None if absent)."""
    if not isinstance(value, str):
        return value
    match = _INTERPOLATION.match(value)
    if not match:
        return value
    node: Any = root
    for part in match.group(1).split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node
