"""The transformer block shared by the unit LM (fairseq ``TransformerDecoderLayer``) and the HuBERT encoder
(fairseq ``TransformerSentenceEncoderLayer``).

Both fairseq layers have the same parameter names (``self_attn.{q,k,v,out}_proj``, ``self_attn_layer_norm``,
``fc1``, ``fc2``, ``final_layer_norm``) and differ only in masking, activation and LayerNorm placement, so one
implementation serves both backbones, and every tuning method attaches to both through the hooks defined here:

* ``kv_replace``: per-layer key/value *inputs* that replace the first L positions before the frozen k/v
  projections (SpeechPrompt's deep prompt);
* ``prefix``: per-layer post-projection keys/values prepended to the attention (prefix tuning). A KV cache is
  the same mechanism, so prefixes and cached positions share one code path;
* adapter slots on :class:`TransformerLayer` (``post_attn``, ``post_ffn``, ``parallel_ffn``), empty by default;
* the ``nn.Linear`` children themselves, which LoRA and S3-Router masks wrap in place.

With nothing attached, the forward is exactly fairseq's. Two optional arguments serve other encoders: ``attn_bias``
adds a float bias to the attention scores (WavLM's gated relative position bias), and ``layer_norm_eps`` sets the
LayerNorms' epsilon (1e-12 in AST's ViT layers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    # fairseq's "gelu_accurate" is the tanh approximation.
    "gelu_accurate": lambda x: F.gelu(x, approximate="tanh"),
    "tanh": torch.tanh,
    "linear": lambda x: x,
}


@dataclass
class LayerKV:
    """Keys and values of one attention layer, ``(B, H, S, head_dim)`` each, already projected."""

    key: Tensor
    value: Tensor

    def __len__(self) -> int:
        return self.key.shape[2]


@dataclass
class KVCache:
    """Projected keys/values of every layer for incremental decoding.

    A cache may start non-empty: prefix-tuning vectors and a prompt computed once per batch are simply its first
    entries. ``positions`` counts, per row, the *tokens* seen so far (prompts and prefixes have no positions), which
    is what positional embeddings need on the next step. ``key_padding`` remembers which cached keys were padding,
    so that later steps of a padded batch keep ignoring them.
    """

    layers: list[LayerKV | None] = field(default_factory=list)
    positions: Tensor | None = None  # (B,) long
    key_padding: Tensor | None = None  # (B, S) bool, True at padded cached keys

    def __len__(self) -> int:
        first = self.layers[0] if self.layers else None
        return 0 if first is None else len(first)

    def update(self, idx: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Append new keys/values ``(B, H, T, hd)`` to layer ``idx`` and return everything cached so far."""
        while len(self.layers) <= idx:
            self.layers.append(None)
        old = self.layers[idx]
        if old is not None:
            key = torch.cat([old.key, key], dim=2)
            value = torch.cat([old.value, value], dim=2)
        self.layers[idx] = LayerKV(key, value)
        return key, value

    def index_select(self, rows: Tensor) -> KVCache:
        """Reorder/select batch rows (beam search)."""
        return KVCache(
            [None if kv is None else LayerKV(kv.key[rows], kv.value[rows]) for kv in self.layers],
            None if self.positions is None else self.positions[rows],
            None if self.key_padding is None else self.key_padding[rows],
        )


class MultiheadAttention(nn.Module):
    """fairseq-compatible multi-head attention on ``scaled_dot_product_attention``.

    Input ``x`` is ``(B, T, D)``. ``attn_mask`` is boolean ``(B, 1, T, S)`` with True where attention is allowed, where
    ``S = prefix/cache length + T``; ``None`` means full attention. ``attn_bias`` (float, ``(B or 1, H, T, S')`` with
    ``S' <= S``) is added to the scores of the *last* ``S'`` keys: a bias computed over the real positions leaves the
    prefix keys in front of them unbiased.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout = dropout
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def _heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)

    def project_kv(self, k_in: Tensor, v_in: Tensor) -> LayerKV:
        """Key/value *inputs* ``(B, S, D)`` through the frozen k/v projections: ``(B, H, S, hd)`` each."""
        return LayerKV(self._heads(self.k_proj(k_in)), self._heads(self.v_proj(v_in)))

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        kv_replace: tuple[Tensor, Tensor] | None = None,
        prefix: LayerKV | None = None,
        cache: KVCache | None = None,
        layer_idx: int = 0,
        attn_bias: Tensor | None = None,
    ) -> Tensor:
        """Self-attention over ``x`` (B, T, D), optionally with the tuning hooks (see the module docstring).

        Args:
            kv_replace: ``(K_in, V_in)``, each ``(B or 1, L, D)``: the key/value inputs at positions ``0..L-1``.
            prefix: projected keys/values prepended before everything else (not used together with ``cache``:
                a cache is seeded with the prefix instead).
            cache: when given, this step's keys/values are appended to it and attention runs over all of it.
            attn_bias: float scores added before the softmax, ``(B or 1, H, T, S')`` over the last ``S'`` keys.
        """
        B, T, D = x.shape
        k_in = v_in = x
        if kv_replace is not None:
            pk, pv = kv_replace
            L = pk.shape[1]
            k_in = torch.cat([pk.expand(B, -1, -1).to(x.dtype), x[:, L:]], dim=1)
            v_in = torch.cat([pv.expand(B, -1, -1).to(x.dtype), x[:, L:]], dim=1)
        q = self._heads(self.q_proj(x))  # (B, H, T, hd)
        k = self._heads(self.k_proj(k_in))
        v = self._heads(self.v_proj(v_in))
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        elif prefix is not None:
            k = torch.cat([prefix.key.expand(B, -1, -1, -1).to(k.dtype), k], dim=2)
            v = torch.cat([prefix.value.expand(B, -1, -1, -1).to(v.dtype), v], dim=2)
        if attn_bias is not None:
            attn_mask = _merge_bias(attn_mask, attn_bias.to(q.dtype), k.shape[2])
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, hd)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, D))


def _merge_bias(attn_mask: Tensor | None, bias: Tensor, num_keys: int) -> Tensor:
    """One float mask for SDPA: ``bias`` over the last keys (zeros in front, for prefixes), ``-inf`` where
    ``attn_mask`` (boolean, True = may attend) forbids."""
    if bias.shape[-1] < num_keys:
        bias = F.pad(bias, (num_keys - bias.shape[-1], 0))  # (B, H, T, S)
    if attn_mask is None:
        return bias
    return bias.masked_fill(~attn_mask, float("-inf"))


class TransformerLayer(nn.Module):
    """One fairseq transformer layer: self-attention and FFN, each with a residual and a LayerNorm.

    ``normalize_before`` selects pre-LN (LN at the start of each sublayer, as ``transformer_lm_big`` and HuBERT large)
    or post-LN (LN after each residual, as HuBERT base). Input and output are ``(B, T, D)``.

    Adapter slots (``None`` until a tuning method sets them, so the frozen state dict is unchanged):
        post_attn: applied to the attention output, before its residual (Houlsby's first adapter).
        post_ffn: applied to the FFN output, before its residual (Houlsby's second adapter).
        parallel_ffn: receives the FFN input; its output is added to the FFN output (AAT's parallel adapter).
    """

    post_attn: nn.Module | None
    post_ffn: nn.Module | None
    parallel_ffn: nn.Module | None

    def __init__(
        self,
        embed_dim: int,
        ffn_dim: int,
        num_heads: int,
        normalize_before: bool,
        activation: str = "relu",
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        bias: bool = True,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
        self.normalize_before = normalize_before
        self.activation = activation
        self.self_attn = MultiheadAttention(embed_dim, num_heads, attention_dropout, bias)
        self.self_attn_layer_norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        self.fc1 = nn.Linear(embed_dim, ffn_dim, bias=bias)
        self.fc2 = nn.Linear(ffn_dim, embed_dim, bias=bias)
        self.final_layer_norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.activation_dropout = nn.Dropout(activation_dropout)
        self.post_attn = self.post_ffn = self.parallel_ffn = None
        # Recompute this layer's activations in backward instead of keeping them (set_activation_checkpointing).
        self.checkpoint_activations = False

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        kv_replace: tuple[Tensor, Tensor] | None = None,
        prefix: LayerKV | None = None,
        cache: KVCache | None = None,
        layer_idx: int = 0,
        attn_bias: Tensor | None = None,
    ) -> Tensor:
        if self.checkpoint_activations and self.training and cache is None and torch.is_grad_enabled():
            # Non-reentrant checkpointing replays dropout with the saved RNG state: the same outputs and gradients.
            return torch.utils.checkpoint.checkpoint(
                self._forward, x, attn_mask, kv_replace, prefix, None, layer_idx, attn_bias, use_reentrant=False
            )
        return self._forward(x, attn_mask, kv_replace, prefix, cache, layer_idx, attn_bias)

    def _forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None,
        kv_replace: tuple[Tensor, Tensor] | None,
        prefix: LayerKV | None,
        cache: KVCache | None,
        layer_idx: int,
        attn_bias: Tensor | None,
    ) -> Tensor:
        residual = x
        if self.normalize_before:
            x = self.self_attn_layer_norm(x)
        x = self.self_attn(x, attn_mask, kv_replace, prefix, cache, layer_idx, attn_bias)
        if self.post_attn is not None:
            x = self.post_attn(x)
        x = residual + self.dropout(x)
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)

        residual = x
        if self.normalize_before:
            x = self.final_layer_norm(x)
        h = self.fc2(self.activation_dropout(ACTIVATIONS[self.activation](self.fc1(x))))
        if self.post_ffn is not None:
            h = self.post_ffn(h)
        if self.parallel_ffn is not None:
            h = h + self.parallel_ffn(x)
        x = residual + self.dropout(h)
        if not self.normalize_before:
            x = self.final_layer_norm(x)
        return x


def set_activation_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Turn activation checkpointing on (or off) in every :class:`TransformerLayer` of ``model``, whatever the
    architecture; returns how many layers there are. It acts in training mode only (no cache)."""
    layers = [m for m in model.modules() if isinstance(m, TransformerLayer)]
    for layer in layers:
        layer.checkpoint_activations = enabled
    return len(layers)


def attention_mask(
    key_padding: Tensor | None,
    query_len: int,
    past_len: int = 0,
    causal: bool = True,
) -> Tensor | None:
    """Boolean ``(B, 1, T, S)`` mask (True = may attend) for ``T`` new positions after ``past_len`` cached ones.

    Args:
        key_padding: ``(B, S)`` True at padded keys, with ``S = past_len + query_len``; ``None`` if there is none.
        causal: query ``i`` (absolute position ``past_len + i``) sees keys ``0..past_len + i``.

    A padded query would see no key at all, and SDPA turns such rows into NaN, which then leaks into the values of
    later layers through ``0 * NaN``. So every query may always attend to its own position; padded outputs are
    garbage but finite, and real positions never attend to them.
    """
    S = past_len + query_len
    if key_padding is None and not causal:
        return None
    device = key_padding.device if key_padding is not None else None
    q_pos = torch.arange(past_len, S, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = k_pos <= q_pos if causal else torch.ones(query_len, S, dtype=torch.bool, device=device)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if key_padding is not None:
        allowed = allowed & ~key_padding[:, None, None, :]
        allowed = allowed | (k_pos == q_pos)[None, None]
    return allowed
