"""The frozen unit language model: GSLM's fairseq ``transformer_lm``, without fairseq.

The module tree and state-dict names are fairseq's (``decoder.embed_tokens``, ``decoder.layers.{i}.self_attn...``,
``decoder.layer_norm``, ``decoder.output_projection``), so an official GSLM checkpoint loads with
``strict=True`` and our exports load back into fairseq. The layers are :class:`~speechprompt.models.transformer.
TransformerLayer`, which carries the hooks every tuning method uses: input prompts, deep prompts (``kv_replace``),
prefixes and the KV cache are arguments of :meth:`UnitLM.forward`; adapters, LoRA and masks attach to the modules
returned by :meth:`UnitLM.transformer_layers`.

Two state-dict entries of fairseq's are not part of this model and are handled by :func:`load_unit_lm` and
:func:`save_unit_lm` instead: ``decoder.version`` (fairseq drops the final LayerNorm of checkpoints older than
version 3, so exports must carry ``[3]``) and ``decoder.embed_positions._float_tensor`` (a dummy buffer of
fairseq's sinusoidal embedding that older fairseq requires in a strict load, and fairseq-fixed ignores).

fairseq's optional input/output projections (``decoder.project_in_dim`` / ``project_out_dim``, which its CLI adds
when only ``--decoder-embed-dim`` is given) are the maps OPT calls ``project_in`` / ``project_out``; this module and
:mod:`~speechprompt.models.speech_lm` name them ``decoder.project_in`` / ``decoder.project_out``, and the loaders map
each original's names onto them (:data:`FAIRSEQ_NAMES` here, the key table of :mod:`~speechprompt.models.
hf_decoders` for OPT), so the exports still write fairseq's names.

The config is in :mod:`~speechprompt.models.unit_lm_config` and the positions in :mod:`~speechprompt.models.positions`.
This module stays over 400 lines on purpose: :meth:`UnitLM.features` is the one forward that prompts, prefixes,
verbalizers and the cache share, for GSLM and for today's speech LMs (:mod:`~speechprompt.models.speech_lm`
overrides only its embedding and position steps), and the checkpoint functions beside it are its file format.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechprompt.config import to_dict
from speechprompt.dictionary import Dictionary
from speechprompt.errors import CheckpointError
from speechprompt.fairseq_compat import load_fairseq_checkpoint, save_fairseq_checkpoint
from speechprompt.models.positions import LearnedPositions, SinusoidalPositions, make_positions
from speechprompt.models.transformer import Dropout, KVCache, LayerKV, TransformerLayer, attention_mask
from speechprompt.models.unit_lm_config import NAMED_CONFIGS, UnitLMConfig

# Names other modules import from here, wherever they are defined.
__all__ = [
    "FAIRSEQ_NAMES", "NAMED_CONFIGS", "LearnedPositions", "SinusoidalPositions", "UnitLM", "UnitLMConfig",
    "UnitLMDecoder", "UnitLMOutput", "fairseq_state_dict", "load_state_strict", "load_unit_lm", "make_positions",
    "save_unit_lm", "state_fingerprint",
]


# --------------------------------------------------------------------------------------------------------------
# Model


class UnitLMDecoder(nn.Module):
    """fairseq's ``TransformerDecoder`` without encoder attention; named as fairseq names it (see :class:`UnitLM`)."""

    def __init__(self, cfg: UnitLMConfig) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.padding_idx = cfg.padding_idx
        self.embed_scale = math.sqrt(d) if cfg.scale_embedding else 1.0
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.token_dim, padding_idx=cfg.padding_idx)
        # fairseq's optional bias-free projections between the embedding/output widths and the layers' width d
        # (its project_in_dim / project_out_dim; OPT's project_in / project_out).
        self.project_in = nn.Linear(cfg.token_dim, d, bias=False) if cfg.token_dim != d else None
        self.embed_positions: nn.Module = (
            LearnedPositions(cfg.max_positions, d, cfg.padding_idx) if cfg.learned_pos
            else SinusoidalPositions(d, cfg.padding_idx)
        )
        self.layers = nn.ModuleList(
            TransformerLayer(d, cfg.ffn_dim, cfg.heads, cfg.normalize_before, cfg.activation, cfg.dropout,
                             cfg.attention_dropout, cfg.activation_dropout)
            for _ in range(cfg.layers)
        )
        self.layer_norm = nn.LayerNorm(d) if cfg.final_layer_norm else None
        self.project_out = nn.Linear(d, cfg.hidden_out_dim, bias=False) if cfg.hidden_out_dim != d else None
        self.output_projection = nn.Linear(cfg.hidden_out_dim, cfg.vocab_size, bias=False)
        self.dropout = Dropout(cfg.dropout)
        self._init_weights(cfg)
        if cfg.tie_embeddings:
            # fairseq shares the Parameter, so the state dict lists it under both names (as fairseq saves it).
            self.output_projection.weight = self.embed_tokens.weight

    def _init_weights(self, cfg: UnitLMConfig) -> None:
        """fairseq's initialisation, so that `pretrain-ulm` starts where fairseq would."""
        nn.init.normal_(self.embed_tokens.weight, mean=0.0, std=cfg.token_dim**-0.5)
        nn.init.normal_(self.output_projection.weight, mean=0.0, std=cfg.hidden_out_dim**-0.5)
        for proj in (self.project_in, self.project_out):
            if proj is not None:
                nn.init.xavier_uniform_(proj.weight)
        with torch.no_grad():
            self.embed_tokens.weight[cfg.padding_idx].zero_()
        for layer in self.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                nn.init.xavier_uniform_(proj.weight, gain=1 / math.sqrt(2))
            nn.init.xavier_uniform_(attn.out_proj.weight)
            nn.init.zeros_(attn.out_proj.bias)


@dataclass
class UnitLMOutput:
    """What :meth:`UnitLM.forward` returns with ``return_hidden=True``."""

    logits: Tensor  # (B, T, V)
    hidden: Tensor  # (B, T, D_out): final states (after the final LayerNorm and project_out), before the output
    # projection; D_out is the output projection's input width (embed_dim unless the model has project_out)


class UnitLM(nn.Module):
    """GSLM's unit LM: a decoder-only transformer over unit tokens, with the hooks of SpeechPrompt-style tuning.

    The only child is ``decoder``, so state-dict keys are fairseq's (``decoder.embed_tokens.weight``, ...).
    Shapes: tokens ``(B, T)`` -> logits ``(B, T, V)``; hidden states are ``(B, T, D)``.
    """

    def __init__(self, cfg: UnitLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.decoder = self._build_decoder(cfg)

    def _build_decoder(self, cfg: Any) -> nn.Module:
        """The ``decoder`` child (a subclass builds its own family's; see :mod:`speechprompt.models.speech_lm`)."""
        return UnitLMDecoder(cfg)

    @property
    def padding_idx(self) -> int:
        return self.cfg.padding_idx

    def transformer_layers(self) -> nn.ModuleList:
        """The :class:`TransformerLayer` stack, where adapters, LoRA and masks attach."""
        return self.decoder.layers

    def embed(self, tokens: Tensor, embed_override: Mapping[int, Tensor] | None = None) -> Tensor:
        """Token embeddings ``(B, T, D)`` before scaling, with rows of ``embed_override`` substituted.

        ``embed_override`` maps a token id to a ``(D,)`` vector (e.g. SpeechPrompt's trainable ``<s>`` separator),
        or to a ``(B, D)`` one vector per row (a batch mixing tasks, see :mod:`speechprompt.serving`); the table
        itself is not copied, so the vector receives the gradient and the frozen table does not.
        """
        emb = self.decoder.embed_tokens(tokens)  # (B, T, D)
        for token_id, vector in (embed_override or {}).items():
            if vector.ndim == 2:
                vector = vector[:, None]  # (B, 1, D): one vector per row
            emb = torch.where(tokens.eq(token_id)[..., None], vector.to(emb.dtype), emb)
        return emb

    def input_embeddings(self, tokens: Tensor, embed_override: Mapping[int, Tensor] | None = None) -> Tensor:
        """What the first layer receives for ``tokens`` ``(B, T)``, without positions: ``(B, T, D)`` with
        ``D = cfg.embed_dim`` (the scaled embeddings, then ``project_in`` when the table is narrower or wider than
        the layers). Input prompts live in this space, and prompts initialised from unit tokens start
        from these."""
        dec = self.decoder
        x = dec.embed_scale * self.embed(tokens, embed_override)  # (B, T, token_dim)
        return x if dec.project_in is None else dec.project_in(x)

    def _token_states(
        self, tokens: Tensor, offset: Tensor | None, embed_override: Mapping[int, Tensor] | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """The first layer's input at the token positions ``(B, T, D)``, and the rotary ``(cos, sin)`` of those
        positions (``None``: this family adds its positions to the embeddings instead). ``offset`` ``(B,)`` counts
        each row's tokens already in the cache."""
        dec = self.decoder
        positions = make_positions(tokens, self.padding_idx, offset)  # (B, T)
        x = self.input_embeddings(tokens, embed_override) + dec.embed_positions(positions).to(
            dec.embed_tokens.weight.dtype)
        return x, None

    def features(
        self,
        tokens: Tensor,
        *,
        input_prompt: Tensor | None = None,
        kv_replace: list[tuple[Tensor, Tensor] | None] | None = None,
        prefix: list[LayerKV] | None = None,
        cache: KVCache | None = None,
        embed_override: Mapping[int, Tensor] | None = None,
        prefix_padding: Tensor | None = None,
    ) -> Tensor:
        """Final hidden states ``(B, T, D_out)`` of the token positions (after the final LayerNorm and, where the
        model has it, ``project_out``, as fairseq's features and HF OPT's last hidden state are).

        Args:
            tokens: ``(B, T)`` token ids. Padding (``padding_idx``) may sit on either side: pads are masked as keys
                and positions count only real tokens (fairseq's ``make_positions``).
            input_prompt: ``(1 or B, L, D)`` vectors placed before the tokens, after token embedding, scaling,
                ``project_in`` and positions (see :meth:`input_embeddings`); they get no positional embedding and no
                outputs.
            kv_replace: per layer, ``(K_in, V_in)`` each ``(1 or B, L, D)``: the key/value *inputs* of the first L
                positions, i.e. of the input prompt, which must have the same L (SpeechPrompt's deep prompt).
                The token positions then see, in layer i, exactly the keys/values of a ``prefix`` entry
                ``LayerKV(k_proj(K_in), v_proj(V_in))``. So with an entry for every layer the token outputs equal
                prefix tuning with those projected vectors, and do not depend on the input prompt's values at all:
                the input prompt only provides the L positions (its own outputs are discarded).
            prefix: per layer, projected keys/values ``(1 or B, H, P, hd)`` attended before everything else
                (prefix tuning). With a ``cache`` the prefix is stored in it, so later calls pass only new tokens.
            cache: incremental decoding. On the first call the prefix, prompt and tokens are cached; later calls
                pass only the new tokens (and no prompt/prefix), whose positions continue from ``cache.positions``.
            embed_override: see :meth:`embed`.
            prefix_padding: ``(1 or B, P)`` True at prefix entries that a row does not use. They are masked as
                keys like padded tokens, so one batch can carry prefixes of different lengths (each row's tokens see
                exactly their own prefix; see :mod:`speechprompt.serving`). ``None``: every row uses all ``P``.
        """
        dec = self.decoder
        B, T = tokens.shape
        past = len(cache) if cache is not None else 0
        first_call_only = (input_prompt, kv_replace, prefix, prefix_padding)
        if cache is not None and past and any(arg is not None for arg in first_call_only):
            raise ValueError("prompts and prefixes go into the first call with a cache only; they are cached since")
        if prefix_padding is not None and (prefix is None or prefix_padding.shape[-1] != len(prefix[0])):
            raise ValueError("prefix_padding needs a prefix of the same length")
        L = 0 if input_prompt is None else input_prompt.shape[1]
        if kv_replace is not None:
            if len(kv_replace) != len(dec.layers):
                raise ValueError(f"kv_replace has {len(kv_replace)} entries for {len(dec.layers)} layers")
            for kv in kv_replace:
                if kv is not None and (kv[0].shape[1] != L or kv[1].shape[1] != L):
                    raise ValueError(f"kv_replace covers {kv[0].shape[1]} positions but the input prompt has {L}")
        if prefix is not None and len(prefix) != len(dec.layers):
            raise ValueError(f"prefix has {len(prefix)} entries for {len(dec.layers)} layers")
        if kv_replace is not None and prefix is None and all(kv is not None for kv in kv_replace):
            # Every layer replaces the prompt positions' key/value inputs, so their hidden states are never read:
            # the tokens see exactly the projected prefix below. Running it as a prefix skips the L prompt positions
            # in every layer (a quarter of the compute for the demo's L = 20 over ~60 units), with the same output.
            dtype = dec.embed_tokens.weight.dtype
            prefix = [layer.self_attn.project_kv(_shared_row(k).to(dtype), _shared_row(v).to(dtype))
                      for layer, (k, v) in zip(dec.layers, kv_replace)]
            input_prompt, kv_replace, L = None, None, 0

        pad = tokens.eq(self.padding_idx)  # (B, T)
        offset = cache.positions if cache is not None and cache.positions is not None else None
        x, rope = self._token_states(tokens, offset, embed_override)  # (B, T, D)
        if input_prompt is not None:
            x = torch.cat([input_prompt.to(x.dtype).expand(B, -1, -1), x], dim=1)  # (B, L + T, D)
            if rope is not None:
                # Prompts have no position: the identity rotation (cos 1, sin 0) at theirs.
                cos, sin = rope
                rope = (F.pad(cos, (0, 0, L, 0), value=1.0), F.pad(sin, (0, 0, L, 0)))  # (B, L + T, hd)
        x = dec.dropout(x)

        if cache is not None and not past and prefix is not None:
            # Seed the cache with the prefix, which then acts as already-seen keys for every later step.
            cache.layers = [LayerKV(p.key.expand(B, -1, -1, -1), p.value.expand(B, -1, -1, -1)) for p in prefix]
            past = len(cache)
            prefix = None
        if prefix is not None:
            past = len(prefix[0])
        key_padding = torch.cat([pad.new_zeros(B, L), pad], dim=1)  # (B, L + T)
        if past:
            if cache is not None and cache.key_padding is not None:
                old = cache.key_padding
            elif prefix_padding is not None:
                old = prefix_padding.expand(B, past)
            else:
                old = pad.new_zeros(B, past)
            key_padding = torch.cat([old, key_padding], dim=1)  # (B, past + L + T)
        if cache is not None:
            cache.key_padding = key_padding
            n_real = (~pad).sum(1)
            cache.positions = n_real if cache.positions is None else cache.positions + n_real
        padded = bool(key_padding.any())
        # Without padding, the mask is SDPA's causal flag when the queries start at key 0, and nothing at all for a
        # single query (one decoding step sees every cached key); only the other cases build a (B, 1, T, S) mask.
        is_causal = not padded and not past and L + T > 1
        mask = None if is_causal or (not padded and L + T == 1) else attention_mask(
            key_padding if padded else None, L + T, past)

        for i, layer in enumerate(dec.layers):
            x = layer(
                x,
                mask,
                kv_replace=None if kv_replace is None else kv_replace[i],
                prefix=None if prefix is None else prefix[i],
                cache=cache,
                layer_idx=i,
                is_causal=is_causal,
                rope=rope,
            )
        x = x[:, L:]  # (B, T, D): the prompt positions give no output
        if dec.layer_norm is not None:
            x = dec.layer_norm(x)
        if dec.project_out is not None:
            x = dec.project_out(x)  # (B, T, D_out)
        return x

    def output_layer(self, hidden: Tensor) -> Tensor:
        """``(..., D)`` hidden states -> ``(..., V)`` logits."""
        return self.decoder.output_projection(hidden)

    def forward(
        self,
        tokens: Tensor,
        *,
        input_prompt: Tensor | None = None,
        kv_replace: list[tuple[Tensor, Tensor] | None] | None = None,
        prefix: list[LayerKV] | None = None,
        cache: KVCache | None = None,
        embed_override: Mapping[int, Tensor] | None = None,
        prefix_padding: Tensor | None = None,
        return_hidden: bool = False,
    ) -> Tensor | UnitLMOutput:
        """Logits ``(B, T, V)`` of the token positions; with ``return_hidden`` a :class:`UnitLMOutput` holding the
        logits and the hidden states. Arguments as in :meth:`features`. With no prompt, prefix or adapter attached
        this is exactly fairseq's forward."""
        hidden = self.features(tokens, input_prompt=input_prompt, kv_replace=kv_replace, prefix=prefix, cache=cache,
                               embed_override=embed_override, prefix_padding=prefix_padding)
        logits = self.output_layer(hidden)
        return UnitLMOutput(logits, hidden) if return_hidden else logits


def _shared_row(t: Tensor) -> Tensor:
    """``t[:1]`` when every row of ``t`` ``(B, ...)`` is the same view of one row (an ``expand``ed batch dim), else
    ``t``: a deep prompt shared by the batch is then projected once, not B times (and autograd keeps no B-fold
    copies of the projection's operands)."""
    return t[:1] if t.shape[0] > 1 and t.stride(0) == 0 else t


# --------------------------------------------------------------------------------------------------------------
# Checkpoints


# fairseq's names of the input/output projections -> ours (and back on export).
FAIRSEQ_NAMES = {"decoder.project_in_dim.weight": "decoder.project_in.weight",
                 "decoder.project_out_dim.weight": "decoder.project_out.weight"}


def _to_our_state(state: dict[str, Tensor], cfg: UnitLMConfig) -> dict[str, Tensor]:
    """Upgrade a fairseq state dict to this model's keys (the renames fairseq's own ``upgrade_state_dict`` does,
    and fairseq's projection names to ours)."""
    state = {FAIRSEQ_NAMES.get(k, k): v for k, v in state.items()}
    state.pop("decoder.version", None)
    for dummy in ("decoder.embed_positions._float_tensor", "decoder.embed_positions.weights"):
        if not cfg.learned_pos:
            state.pop(dummy, None)
    if "decoder.output_projection.weight" not in state:
        source = "decoder.embed_tokens.weight" if cfg.tie_embeddings else "decoder.embed_out"
        if source in state:
            state["decoder.output_projection.weight"] = state[source]
    if not cfg.tie_embeddings:
        state.pop("decoder.embed_out", None)
    renames = {"0": "self_attn_layer_norm", "2": "final_layer_norm"}
    for key in list(state):
        m = re.match(r"^decoder\.layers\.(\d+)\.layer_norms\.([02])\.(weight|bias)$", key)
        if m:
            state[f"decoder.layers.{m[1]}.{renames[m[2]]}.{m[3]}"] = state.pop(key)
    return state


def load_unit_lm(
    path: str | os.PathLike, dict_path: str | os.PathLike | None = None, *, dtype: torch.dtype | None = None
) -> tuple[UnitLM, Dictionary]:
    """Load a fairseq unit-LM checkpoint (GSLM's, or one written by :func:`save_unit_lm`), without fairseq.

    Args:
        path: the checkpoint (``.pt``).
        dict_path: its ``dict.txt``; by default the one beside the checkpoint.
        dtype: hold the parameters in this floating dtype (e.g. ``torch.bfloat16`` for a frozen backbone: half the
            memory, and the forward computes in it); ``None`` keeps the checkpoint's (fp32). Tuning methods keep
            their own tensors in fp32 whatever the backbone's dtype, and the model casts them where they enter.
    Returns:
        The model (in eval mode, on CPU) and its dictionary.
    Raises:
        CheckpointError: unreadable file, unsupported architecture, a dictionary whose size does not match the
            embedding, or state-dict keys/shapes that do not fit the architecture.
    """
    path = Path(path)
    ckpt = load_fairseq_checkpoint(path)
    dict_path = Path(dict_path) if dict_path is not None else path.parent / "dict.txt"
    if not dict_path.is_file():
        raise CheckpointError(f"{path}: no dictionary at {dict_path} (pass the unit LM's dict.txt)")
    dictionary = Dictionary.load(dict_path)
    state = ckpt["model"]
    emb = state.get("decoder.embed_tokens.weight")
    if not isinstance(emb, Tensor) or emb.ndim != 2:
        raise CheckpointError(f"{path}: no decoder.embed_tokens.weight; is this a fairseq language model?")
    if emb.shape[0] != len(dictionary):
        raise CheckpointError(
            f"{path} has {emb.shape[0]} embedding rows but {dict_path} gives {len(dictionary)} symbols "
            f"(including 4 specials): a mismatched dict"
        )
    cfg = dataclasses.replace(UnitLMConfig.from_fairseq(ckpt["cfg"]), vocab_size=len(dictionary))
    version = state.get("decoder.version")
    if isinstance(version, Tensor) and float(version.flatten()[0]) <= 2:
        # fairseq: "earlier checkpoints did not normalize after the stack of layers"
        cfg = dataclasses.replace(cfg, final_layer_norm=False)
    if cfg.learned_pos and "decoder.embed_positions.weight" in state:
        rows = state["decoder.embed_positions.weight"].shape[0]
        cfg = dataclasses.replace(cfg, max_positions=rows - cfg.padding_idx - 1)
    state = _to_our_state(state, cfg)
    if cfg.tie_embeddings and not torch.equal(state["decoder.embed_tokens.weight"],
                                              state["decoder.output_projection.weight"]):
        raise CheckpointError(f"{path}: the config ties input/output embeddings but the checkpoint's differ")
    model = UnitLM(cfg)
    load_state_strict(model, state, str(path))
    if dtype is not None:
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        del state, ckpt  # free the checkpoint's copy before the cast makes another
        model.to(dtype)
    return model.eval(), dictionary


def load_state_strict(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error that lists missing/unexpected keys and bad shapes."""
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in ours.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
            problems.append(f"{label}: {', '.join(items[:8])}{more}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(dict(state), strict=True)


def fairseq_state_dict(model: UnitLM) -> dict[str, Tensor]:
    """The model's state dict as fairseq saves it: fairseq's projection names, plus ``decoder.version`` and, for
    sinusoidal positions, the ``_float_tensor`` dummy that older fairseq expects."""
    to_fairseq = {ours: theirs for theirs, ours in FAIRSEQ_NAMES.items()}
    state = {to_fairseq.get(k, k): v for k, v in model.state_dict().items()}
    state["decoder.version"] = torch.tensor([3.0])
    if not model.cfg.learned_pos:
        state["decoder.embed_positions._float_tensor"] = torch.zeros(1)
    return state


def save_unit_lm(
    model: UnitLM, dictionary: Dictionary, path: str | os.PathLike, extra: Mapping[str, Any] | None = None
) -> None:
    """Write ``model`` as a fairseq ``language_modeling`` checkpoint at ``path`` and ``dict.txt`` beside it.

    fairseq loads the result with ``checkpoint_utils.load_model_ensemble([path])`` (its task's ``data`` is the
    checkpoint's directory, where ``dict.txt`` is; pass ``arg_overrides={"data": ...}`` after moving the files).

    Args:
        extra: JSON-like values stored under the checkpoint's ``cfg["speechprompt"]`` (e.g. a training summary).
    """
    if len(dictionary) != model.cfg.vocab_size:
        raise CheckpointError(f"dictionary has {len(dictionary)} symbols but the model {model.cfg.vocab_size} rows")
    path = Path(path)
    data_dir = str(path.parent.resolve())
    cfg = {
        "_name": None,
        "common": {"seed": 1, "tpu": False, "fp16": False, "bf16": False, "use_plasma_view": False,
                   "plasma_path": "/tmp/plasma"},
        "dataset": {"batch_size": None, "batch_size_valid": None, "dataset_impl": None, "data_buffer_size": 10},
        "model": model.cfg.to_fairseq_cfg(),
        "task": {
            "_name": "language_modeling", "data": data_dir, "sample_break_mode": "eos",
            "tokens_per_sample": model.cfg.max_positions, "output_dictionary_size": -1, "self_target": False,
            "future_target": False, "past_target": False, "add_bos_token": False,
            "max_target_positions": model.cfg.max_positions, "shorten_method": "none",
            "shorten_data_split_list": "", "pad_to_fixed_length": False, "pad_to_fixed_bsz": False, "seed": 1,
            "batch_size": None, "batch_size_valid": None, "dataset_impl": None, "data_buffer_size": 10,
            "tpu": False, "use_plasma_view": False, "plasma_path": "/tmp/plasma",
        },
        "criterion": {"_name": "cross_entropy", "sentence_avg": False},
        "speechprompt": {"unit_lm_config": to_dict(model.cfg), **dict(extra or {})},
    }
    dictionary.save(path.parent / "dict.txt")
    save_fairseq_checkpoint(path, fairseq_state_dict(model), cfg)


def state_fingerprint(obj: nn.Module | Mapping[str, Tensor]) -> str:
    """sha256 over the sorted keys, dtypes, shapes and bytes of a state dict.

    Prompt checkpoints store it for the *frozen base* model and refuse to load against another one, so compute it
    on the base model before a tuning method attaches (LoRA and masks rename or add keys).
    """
    state = obj.state_dict() if isinstance(obj, nn.Module) else obj
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


__all__: list[str] = [
    "FAIRSEQ_NAMES", "NAMED_CONFIGS", "UnitLM", "UnitLMConfig", "UnitLMOutput", "fairseq_state_dict",
    "load_state_strict", "load_unit_lm", "make_positions", "save_unit_lm", "state_fingerprint",
]
