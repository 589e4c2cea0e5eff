"""Greedy and beam search on the KV cache, and sequence scoring."""

from __future__ import annotations

import itertools

import pytest
import torch

from speechprompt.models.generation import beam_search, greedy, sequence_logprob
from speechprompt.models.transformer import LayerKV
from speechprompt.models.unit_lm import UnitLM, UnitLMConfig

EOS, PAD = 2, 1


def _model() -> UnitLM:
    torch.manual_seed(0)
    model = UnitLM(UnitLMConfig.named("tiny", vocab_size=16, embed_dim=32, ffn_dim=64)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _context() -> torch.Tensor:
    """Left-padded contexts of lengths 5, 3 and 1."""
    return torch.tensor([[2, 5, 9, 11, 4], [PAD, PAD, 2, 7, 7], [PAD, PAD, PAD, PAD, 2]])


def _hooks() -> dict:
    g = torch.Generator().manual_seed(2)
    L, D = 3, 32
    return {
        "input_prompt": torch.randn(1, L, D, generator=g),
        "kv_replace": [(torch.randn(1, L, D, generator=g), torch.randn(1, L, D, generator=g)) for _ in range(2)],
        "embed_override": {0: torch.randn(D, generator=g)},
    }


@pytest.mark.parametrize("with_hooks", [False, True])
def test_cached_greedy_equals_uncached(with_hooks: bool) -> None:
    model = _model()
    kwargs = _hooks() if with_hooks else None
    cached = greedy(model, _context(), 12, EOS, model_kwargs=kwargs)
    uncached = greedy(model, _context(), 12, EOS, model_kwargs=kwargs, use_cache=False)
    assert torch.equal(cached, uncached)
    assert cached.shape[0] == 3 and 0 < cached.shape[1] <= 12


def test_greedy_with_prefix_matches_uncached() -> None:
    model = _model()
    g = torch.Generator().manual_seed(4)
    prefix = [LayerKV(torch.randn(1, 4, 2, 8, generator=g), torch.randn(1, 4, 2, 8, generator=g))] * 2
    kwargs = {"prefix": prefix}
    assert torch.equal(greedy(model, _context(), 8, EOS, model_kwargs=kwargs),
                       greedy(model, _context(), 8, EOS, model_kwargs=kwargs, use_cache=False))


def test_greedy_rows_are_independent_of_batching() -> None:
    model = _model()
    batch = greedy(model, _context(), 10, EOS)
    for row, ctx in enumerate(_context()):
        alone = greedy(model, ctx[ctx.ne(PAD)][None], 10, EOS)
        n = alone.shape[1]
        assert torch.equal(batch[row, :n], alone[0])
        assert bool(batch[row, n:].eq(PAD).all())


def test_greedy_stops_at_eos_and_pads_after() -> None:
    model = _model()
    out = greedy(model, _context(), 30, EOS, allowed_tokens=[EOS, 5, 6])
    assert set(out.unique().tolist()) <= {EOS, 5, 6, PAD}
    for row in out:
        hits = (row == EOS).nonzero()
        if len(hits):
            assert bool(row[int(hits[0]) + 1:].eq(PAD).all())
    # Only EOS allowed: every row ends at once.
    assert greedy(model, _context(), 5, EOS, allowed_tokens=[EOS]).tolist() == [[EOS]] * 3


def test_beam_of_one_is_greedy() -> None:
    model = _model()
    kwargs = _hooks()
    g = greedy(model, _context(), 10, EOS, model_kwargs=kwargs)
    b = beam_search(model, _context(), 10, EOS, beam_size=1, length_penalty=0.0, model_kwargs=kwargs)
    assert torch.equal(b[:, : g.shape[1]], g)
    assert bool(b[:, g.shape[1]:].eq(PAD).all())


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_wide_beam_is_exhaustive(length_penalty: float) -> None:
    """With a beam as wide as the number of hypotheses, beam search finds the brute-force optimum."""
    model = _model()
    allowed, max_new = [EOS, 5, 9], 3
    ctx = _context()
    best = beam_search(model, ctx, max_new, EOS, beam_size=16, length_penalty=length_penalty,
                       allowed_tokens=allowed)
    for row in range(ctx.shape[0]):
        real = ctx[row][ctx[row].ne(PAD)]
        # Complete hypotheses: ended by EOS, or cut at max_new tokens.
        hyps = [list(h) for n in range(1, max_new + 1) for h in itertools.product(allowed, repeat=n)
                if EOS not in h[:-1] and (h[-1] == EOS or n == max_new)]
        seqs = torch.full((len(hyps), len(real) + max_new), PAD)
        mask = torch.zeros_like(seqs, dtype=torch.bool)
        for i, h in enumerate(hyps):
            seqs[i, : len(real) + len(h)] = torch.cat([real, torch.tensor(h)])
            mask[i, len(real): len(real) + len(h)] = True
        with torch.no_grad():
            scores = sequence_logprob(model, seqs, mask)
        lengths = torch.tensor([float(len(h)) for h in hyps])
        ranked = scores / lengths.pow(length_penalty) if length_penalty else scores
        expected = hyps[int(ranked.argmax())]
        got = [t for t in best[row].tolist() if t != PAD]
        assert got == expected


def test_sequence_logprob_matches_a_manual_sum() -> None:
    model = _model()
    tokens = torch.tensor([[2, 5, 9, 2, PAD, PAD], [PAD, 2, 7, 7, 8, 2]])
    with torch.no_grad():
        got = sequence_logprob(model, tokens)
        for row in range(2):
            real = tokens[row][tokens[row].ne(PAD)]
            logp = torch.log_softmax(model(real[None])[0], dim=-1)
            manual = sum(float(logp[t - 1, real[t]]) for t in range(1, len(real)))
            assert got[row].item() == pytest.approx(manual, abs=1e-5)
