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

With nothing attached, the forward is fairseq's (the same values up to float rounding; the parity tests hold it to
1e-5). Two optional arguments serve other encoders: ``attn_bias`` adds a float bias to the attention scores (WavLM's
gated relative position bias), and ``layer_norm_eps`` sets the LayerNorms' epsilon (1e-12 in AST's ViT layers).
Today's decoder LMs (OPT, LLaMA, Qwen2; :mod:`speechprompt.models.speech_lm`) take the rest of the options, each
off by default: RMSNorm, a SwiGLU FFN (``mlp.{gate,up,down}_proj``), rotary positions applied to q and k (``rope``),
grouped-query attention (fewer k/v heads), per-projection bias flags and a head width other than ``d / heads``.
Where it saves time or memory, it takes a faster route to the same values: SDPA's causal flag instead of a
materialised mask, an in-place KV cache when no gradient is wanted, and, for backward, byte masks instead of float
noise for dropout and relu, and attention probabilities recomputed instead of kept (see each class for when).

The parts live beside it: :mod:`~speechprompt.models.layer_parts` (activations, RMSNorm, SwiGLU, rotary positions),
:mod:`~speechprompt.models.kv_cache` (prefixes and the decoding cache) and :mod:`~speechprompt.models.lean_ops` (the
memory-lean autograd functions); this module re-exports them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from speechprompt.models.kv_cache import KVCache, LayerKV
from speechprompt.models.layer_parts import ACTIVATIONS, RMSNorm, SwiGLU, apply_rotary
from speechprompt.models.lean_ops import AttentionWithDropout, Dropout, ReluKeepingMask, SiluGate, records_grad

# Names other modules import from here (the layer's public surface), wherever they are defined.
__all__ = [
    "ACTIVATIONS", "AttentionWithDropout", "Dropout", "KVCache", "LayerKV", "MultiheadAttention", "RMSNorm",
    "ReluKeepingMask", "SiluGate", "SwiGLU", "TransformerLayer", "apply_rotary", "attention_mask",
    "set_activation_checkpointing",
]


class MultiheadAttention(nn.Module):
    """fairseq-compatible multi-head attention on ``scaled_dot_product_attention``.

    Input ``x`` is ``(B, T, D)``. ``attn_mask`` is boolean ``(B, 1, T, S)`` with True where attention is allowed, where
    ``S = prefix/cache length + T``; ``None`` means full attention, or causal attention with ``is_causal``.
    ``attn_bias`` (float, ``(B or 1, H, T, S')`` with ``S' <= S``) is added to the scores of the *last* ``S'`` keys:
    a bias computed over the real positions leaves the prefix keys in front of them unbiased.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool | None = None,
        out_bias: bool | None = None,
    ) -> None:
        """``num_kv_heads`` < ``num_heads`` is grouped-query attention (each k/v head serves ``num_heads /
        num_kv_heads`` query heads); ``head_dim`` defaults to ``embed_dim / num_heads``; ``qkv_bias``/``out_bias``
        override ``bias`` for the q/k/v and the output projections (Qwen2: biased q/k/v, no output bias)."""
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
            head_dim = embed_dim // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.num_kv_heads = num_kv_heads
        self.kv_dim = num_kv_heads * head_dim  # width of the k/v projections' outputs
        self.dropout = dropout
        qkv_bias = bias if qkv_bias is None else qkv_bias
        out_bias = bias if out_bias is None else out_bias
        self.k_proj = nn.Linear(embed_dim, self.kv_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(embed_dim, self.kv_dim, bias=qkv_bias)
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=out_bias)

    def _heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H or H_kv, T, hd)

    def project_kv(self, k_in: Tensor, v_in: Tensor) -> LayerKV:
        """Key/value *inputs* ``(B, S, D)`` through the frozen k/v projections: ``(B, H_kv, S, hd)`` each (no
        rotary position: what enters here is a prompt, which has none)."""
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
        is_causal: bool = False,
        rope: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Self-attention over ``x`` (B, T, D), optionally with the tuning hooks (see the module docstring).

        Args:
            kv_replace: ``(K_in, V_in)``, each ``(B or 1, L, D)``: the key/value inputs at positions ``0..L-1``.
            prefix: projected keys/values prepended before everything else (not used together with ``cache``:
                a cache is seeded with the prefix instead).
            cache: when given, this step's keys/values are appended to it and attention runs over all of it.
            attn_bias: float scores added before the softmax, ``(B or 1, H, T, S')`` over the last ``S'`` keys.
            is_causal: query ``i`` attends to keys ``0..i``, without a materialised mask (SDPA's own causal kernel:
                no ``(T, S)`` mask to build, convert and read). Only with ``attn_mask=None``, no ``attn_bias`` and
                no earlier keys (prefix or cached positions), since SDPA aligns the causal diagonal at key 0.
            rope: rotary ``(cos, sin)``, each ``(B, T, hd)``, for this call's positions: queries and keys are rotated
                before the cache stores the keys (prefix entries, which have no position, are never rotated).
        """
        B, T, D = x.shape
        k_in = v_in = x
        if kv_replace is not None:
            pk, pv = kv_replace
            L = pk.shape[1]
            k_in = torch.cat([pk.expand(B, -1, -1).to(x.dtype), x[:, L:]], dim=1)
            v_in = torch.cat([pv.expand(B, -1, -1).to(x.dtype), x[:, L:]], dim=1)
        q = self._heads(self.q_proj(x))  # (B, H, T, hd)
        k = self._heads(self.k_proj(k_in))  # (B, H_kv, T, hd)
        v = self._heads(self.v_proj(v_in))
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        elif prefix is not None:
            k = torch.cat([prefix.key.expand(B, -1, -1, -1).to(k.dtype), k], dim=2)
            v = torch.cat([prefix.value.expand(B, -1, -1, -1).to(v.dtype), v], dim=2)
        if is_causal and (attn_mask is not None or attn_bias is not None or k.shape[2] != T):
            raise ValueError(
                "is_causal needs attn_mask=None, no attn_bias and no prefix or cached keys before the queries"
            )
        if self.num_kv_heads != self.num_heads:
            # Grouped-query attention: the cache keeps H_kv heads; each serves H / H_kv consecutive query heads.
            k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)  # (B, H, S, hd)
            v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        if attn_bias is not None:
            attn_mask = _merge_bias(attn_mask, attn_bias.to(q.dtype), k.shape[2])
        dropout = self.dropout if self.training else 0.0
        if dropout and q.device.type == "cpu" and records_grad(q, k, v):
            out = AttentionWithDropout.apply(q, k, v, attn_mask, is_causal, dropout)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal)
        # out: (B, H, T, hd)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


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

    Decoder-LM options (defaults: fairseq's layer): ``norm="rms"`` makes both norms :class:`RMSNorm`;
    ``ffn="swiglu"`` replaces ``fc1``/``fc2`` by ``mlp`` (a :class:`SwiGLU`, ``activation`` its gate's); the
    attention options are :class:`MultiheadAttention`'s.

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
        *,
        norm: str = "layer",
        ffn: str = "mlp",
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool | None = None,
        out_bias: bool | None = None,
        ffn_bias: bool | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
        if norm not in ("layer", "rms") or ffn not in ("mlp", "swiglu"):
            raise ValueError(f"norm must be 'layer' or 'rms' and ffn 'mlp' or 'swiglu', got {norm!r}, {ffn!r}")
        self.normalize_before = normalize_before
        self.activation = activation
        self.self_attn = MultiheadAttention(embed_dim, num_heads, attention_dropout, bias, num_kv_heads=num_kv_heads,
                                            head_dim=head_dim, qkv_bias=qkv_bias, out_bias=out_bias)
        make_norm = (lambda: RMSNorm(embed_dim, layer_norm_eps)) if norm == "rms" else (
            lambda: nn.LayerNorm(embed_dim, eps=layer_norm_eps))
        self.self_attn_layer_norm = make_norm()
        ffn_bias = bias if ffn_bias is None else ffn_bias
        self.mlp: SwiGLU | None = None
        if ffn == "swiglu":
            self.mlp = SwiGLU(embed_dim, ffn_dim, activation, ffn_bias)
        else:
            self.fc1 = nn.Linear(embed_dim, ffn_dim, bias=ffn_bias)
            self.fc2 = nn.Linear(ffn_dim, embed_dim, bias=ffn_bias)
        self.final_layer_norm = make_norm()
        self.dropout = Dropout(dropout)
        self.activation_dropout = Dropout(activation_dropout)
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
        is_causal: bool = False,
        rope: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """``(B, T, D)`` -> ``(B, T, D)``; the arguments are :meth:`MultiheadAttention.forward`'s."""
        if self.checkpoint_activations and self.training and cache is None and torch.is_grad_enabled():
            # Non-reentrant checkpointing replays dropout with the saved RNG state: the same outputs and gradients.
            return torch.utils.checkpoint.checkpoint(
                self._forward, x, attn_mask, kv_replace, prefix, None, layer_idx, attn_bias, is_causal, rope,
                use_reentrant=False,
            )
        return self._forward(x, attn_mask, kv_replace, prefix, cache, layer_idx, attn_bias, is_causal, rope)

    def _forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None,
        kv_replace: tuple[Tensor, Tensor] | None,
        prefix: LayerKV | None,
        cache: KVCache | None,
        layer_idx: int,
        attn_bias: Tensor | None,
        is_causal: bool,
        rope: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        residual = x
        if self.normalize_before:
            x = self.self_attn_layer_norm(x)
        x = self.self_attn(x, attn_mask, kv_replace, prefix, cache, layer_idx, attn_bias, is_causal, rope)
        if self.post_attn is not None:
            x = self.post_attn(x)
        x = residual + self.dropout(x)
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)

        residual = x
        if self.normalize_before:
            x = self.final_layer_norm(x)
        if self.mlp is not None:
            h = self.mlp(x, self.activation_dropout)
        else:
            h = self.fc2(self.activation_dropout(self._activation(self.fc1(x))))
        if self.post_ffn is not None:
            h = self.post_ffn(h)
        if self.parallel_ffn is not None:
            h = h + self.parallel_ffn(x)
        x = residual + self.dropout(h)
        if not self.normalize_before:
            x = self.final_layer_norm(x)
        return x

    def _activation(self, x: Tensor) -> Tensor:
        """The FFN activation; relu keeps only a byte mask for backward when a frozen, untouched ``fc2`` will not
        keep its input anyway (frozen weights need no gradient; a hooked or wrapped linear may read it)."""
        if (self.activation == "relu" and records_grad(x) and not self.fc2.weight.requires_grad
                and _plain_linear(self.fc2)):
            return ReluKeepingMask.apply(x)
        return ACTIVATIONS[self.activation](x)


def _plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` itself (not a subclass or wrapper) with no hooks: nothing but it sees its input."""
    return type(module) is nn.Linear and not (module._forward_hooks or module._forward_pre_hooks)


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
