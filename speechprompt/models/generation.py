"""Batched decoding and scoring with the unit LM: greedy and beam search on the KV cache, and sequence log-probs.

Decoding prefills the cache once with the whole (left-padded) context, including any input prompt, deep prompt or
prefix, and then feeds one token per step. Rows that have produced ``eos`` keep being fed ``<pad>``, which is
masked as a key and does not advance positions, so a finished row never disturbs the others.

``model_kwargs`` are the keyword arguments of :meth:`UnitLM.forward`: ``input_prompt``, ``kv_replace`` and
``prefix`` go into the prefill call only (they live in the cache afterwards); ``embed_override`` is passed on every
call, since it concerns token embeddings. The model's train/eval mode is left to the caller.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from speechprompt.models.transformer import KVCache
from speechprompt.models.unit_lm import UnitLM

# Keyword arguments of UnitLM.forward that are consumed by the first call with a cache.
_PREFILL_ONLY = ("input_prompt", "kv_replace", "prefix", "prefix_padding")


def split_step_kwargs(model_kwargs: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(kwargs of the prefill call, kwargs of every later call on the cache it filled)."""
    prefill = dict(model_kwargs or {})
    return prefill, {k: v for k, v in prefill.items() if k not in _PREFILL_ONLY}


def _disallowed(allowed_tokens: Sequence[int] | Tensor | None, vocab: int, device: torch.device) -> Tensor | None:
    """``(V,)`` bool, True for tokens that may not be generated; None if all may."""
    if allowed_tokens is None:
        return None
    allowed = torch.as_tensor(allowed_tokens, dtype=torch.long, device=device).flatten()
    if not allowed.numel() or int(allowed.min()) < 0 or int(allowed.max()) >= vocab:
        raise ValueError(f"allowed_tokens must be a non-empty set of ids in [0, {vocab})")
    mask = torch.ones(vocab, dtype=torch.bool, device=device)
    mask[allowed] = False
    return mask


def _check_context(model: UnitLM, tokens: Tensor) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"context tokens must be (B, T), got shape {tuple(tokens.shape)}")
    if bool(tokens.eq(model.padding_idx).all(dim=1).any()):
        raise ValueError("every context row needs at least one real token (e.g. </s>)")


@torch.no_grad()
def greedy(
    model: UnitLM,
    prompt_tokens: Tensor,
    max_new_tokens: int,
    eos: int,
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    allowed_tokens: Sequence[int] | Tensor | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Greedy decoding of a batch.

    Args:
        prompt_tokens: ``(B, T)`` left-padded context; every row holds at least one real token.
        max_new_tokens: most tokens generated per row (``eos`` included).
        eos: the token that ends a row; it is included in the output.
        allowed_tokens: ids that may be generated (e.g. the units and ``</s>``); None allows all.
        use_cache: False recomputes the whole sequence every step (the reference the cache is tested against).
    Returns:
        ``(B, N)`` long, ``N <= max_new_tokens``: the generated tokens, ``<pad>`` after a row's ``eos``.
    """
    _check_context(model, prompt_tokens)
    prefill, every = split_step_kwargs(model_kwargs)
    banned = _disallowed(allowed_tokens, model.cfg.vocab_size, prompt_tokens.device)
    if use_cache:
        cache = KVCache()
        logits = model(prompt_tokens, cache=cache, **prefill)[:, -1]  # (B, V)
        return greedy_from_cache(model, cache, logits, max_new_tokens, eos, step_kwargs=every, banned=banned)
    B, pad = prompt_tokens.shape[0], model.padding_idx
    out = prompt_tokens.new_full((B, max_new_tokens), pad)
    done = torch.zeros(B, dtype=torch.bool, device=prompt_tokens.device)
    seq, steps = prompt_tokens, 0
    while steps < max_new_tokens and not bool(done.all()):
        logits = model(seq, **prefill)[:, -1]
        if banned is not None:
            logits = logits.masked_fill(banned, float("-inf"))
        nxt = logits.argmax(dim=-1).masked_fill(done, pad)  # (B,)
        out[:, steps] = nxt
        done |= nxt.eq(eos)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        steps += 1
    return out[:, :steps]


@torch.no_grad()
def greedy_from_cache(
    model: UnitLM,
    cache: KVCache,
    logits: Tensor,
    max_new_tokens: int,
    eos: int,
    *,
    step_kwargs: Mapping[str, Any] | None = None,
    banned: Tensor | None = None,
) -> Tensor:
    """Greedy decoding after a context already in ``cache``, from its last logits ``(B, V)``.

    For callers that need the context pass for something else too (classification scores the candidates and
    decodes freely from one pass). ``step_kwargs`` are the non-prefill model arguments (``embed_override``);
    ``banned`` is ``(V,)`` bool, True for tokens that may not be generated. ``cache`` is extended in place.
    """
    B, pad = logits.shape[0], model.padding_idx
    out = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=logits.device)
    if max_new_tokens < 1:
        return out
    done = torch.zeros(B, dtype=torch.bool, device=logits.device)
    steps = 0
    while True:
        if banned is not None:
            logits = logits.masked_fill(banned, float("-inf"))
        nxt = logits.argmax(dim=-1).masked_fill(done, pad)  # (B,)
        out[:, steps] = nxt
        done |= nxt.eq(eos)
        steps += 1
        if steps == max_new_tokens or bool(done.all()):
            return out[:, :steps]
        logits = model(nxt[:, None], cache=cache, **(step_kwargs or {}))[:, -1]  # (B, V)


@torch.no_grad()
def beam_search(
    model: UnitLM,
    prompt_tokens: Tensor,
    max_new_tokens: int,
    eos: int,
    *,
    beam_size: int = 4,
    length_penalty: float = 1.0,
    model_kwargs: Mapping[str, Any] | None = None,
    allowed_tokens: Sequence[int] | Tensor | None = None,
) -> Tensor:
    """Batched beam search on the KV cache (the context is prefilled once per row, then copied to its beams).

    Hypotheses are scored by their summed log-probabilities under the full vocabulary (``allowed_tokens`` only
    removes candidates), so a score equals :func:`sequence_logprob` of the result. A finished hypothesis stays in
    its beam with a frozen score; when every beam has finished (or after ``max_new_tokens``), the best one by
    ``score / length ** length_penalty`` (length counts ``eos``; 0 disables normalisation) is returned. With a
    beam at least as wide as the number of partial hypotheses the search is exhaustive.

    Returns:
        ``(B, N)`` long, ``N <= max_new_tokens``, ``<pad>`` after each row's ``eos``.
    """
    _check_context(model, prompt_tokens)
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    B, V, pad = prompt_tokens.shape[0], model.cfg.vocab_size, model.padding_idx
    device = prompt_tokens.device
    K = min(beam_size, V)
    prefill, every = split_step_kwargs(model_kwargs)
    banned = _disallowed(allowed_tokens, V, device)

    def log_probs(logits: Tensor) -> Tensor:
        logp = F.log_softmax(logits.float(), dim=-1)
        return logp if banned is None else logp.masked_fill(banned, float("-inf"))

    cache = KVCache()
    logp = log_probs(model(prompt_tokens, cache=cache, **prefill)[:, -1])  # (B, V)
    # Beams beyond the number of real candidates start "dead" at -inf and can never win.
    scores, tok = logp.topk(K, dim=-1)  # (B, K)
    seqs = tok[..., None]  # (B, K, 1)
    finished = tok.eq(eos)
    lengths = torch.ones(B, K, device=device)
    rows = torch.arange(B, device=device)
    cache = cache.index_select(rows.repeat_interleave(K))  # (B*K) rows, beam-major within each batch row
    # A finished beam has exactly one continuation, <pad>, which keeps its score.
    frozen = torch.full((V,), float("-inf"), device=device)
    frozen[pad] = 0.0
    for _ in range(1, max_new_tokens):
        if bool(finished.all()):
            break
        last = seqs[..., -1].masked_fill(finished, pad)  # (B, K)
        logp = log_probs(model(last.reshape(B * K, 1), cache=cache, **every)[:, -1]).view(B, K, V)
        logp = torch.where(finished[..., None], frozen, logp)
        cand = scores[..., None] + logp  # (B, K, V)
        scores, flat = cand.view(B, K * V).topk(K, dim=-1)  # (B, K)
        beam, tok = flat // V, flat % V
        seqs = torch.cat([seqs.gather(1, beam[..., None].expand(-1, -1, seqs.shape[2])), tok[..., None]], dim=2)
        was_finished = finished.gather(1, beam)
        finished = was_finished | tok.eq(eos)
        lengths = lengths.gather(1, beam) + (~was_finished).float()
        cache = cache.index_select((rows[:, None] * K + beam).reshape(-1))
    normalized = scores / lengths.pow(length_penalty) if length_penalty else scores
    best = normalized.argmax(dim=1)  # (B,)
    return seqs[rows, best]


def sequence_logprob(
    model: UnitLM,
    tokens: Tensor,
    target_mask: Tensor | None = None,
    *,
    model_kwargs: Mapping[str, Any] | None = None,
) -> Tensor:
    """Summed natural-log probability of the target tokens of each row, in one teacher-forced forward.

    Args:
        tokens: ``(B, T)`` padded either side; token ``t`` is predicted from tokens ``< t``.
        target_mask: ``(B, T)`` bool, the tokens to score; by default every real token but the first of its row.
        model_kwargs: keyword arguments of :meth:`UnitLM.forward` (prompts, prefixes...).
    Returns:
        ``(B,)`` float32. Gradients flow when called outside ``torch.no_grad``.
    """
    real = tokens.ne(model.padding_idx)
    if target_mask is None:
        target_mask = real & (real.long().cumsum(dim=1) > 1)
    if bool(target_mask[:, 0].any()):
        raise ValueError("the first position has no context to be predicted from")
    logits = model(tokens, **dict(model_kwargs or {}))[:, :-1]  # (B, T-1, V): position t-1 predicts token t
    logp = F.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)  # (B, T-1)
    return logp.masked_fill(~target_mask[:, 1:], 0.0).sum(dim=1)
