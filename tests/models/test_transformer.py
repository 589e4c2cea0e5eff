"""The shared transformer layer's fast paths are exact: causal flag, in-place KV cache, memory-lean autograd pieces."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from speechprompt.models.lean_ops import records_grad
from speechprompt.models.transformer import (
    AttentionWithDropout,
    Dropout,
    KVCache,
    LayerKV,
    ReluKeepingMask,
    SiluGate,
    SwiGLU,
    TransformerLayer,
    attention_mask,
)


def _layer(**kwargs) -> TransformerLayer:
    torch.manual_seed(0)
    return TransformerLayer(32, 64, 4, normalize_before=True, **kwargs).eval()


def test_causal_flag_equals_the_materialised_mask() -> None:
    layer = _layer()
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        masked = layer(x, attention_mask(None, 7))
        flagged = layer(x, None, is_causal=True)
    torch.testing.assert_close(flagged, masked, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="is_causal"):
        layer(x, None, prefix=LayerKV(torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8)), is_causal=True)


def test_cache_writes_in_place_without_autograd_and_concatenates_with_it() -> None:
    g = torch.Generator().manual_seed(1)
    steps = [(torch.randn(2, 4, n, 8, generator=g), torch.randn(2, 4, n, 8, generator=g)) for n in (5, 1, 1, 3)]
    expected_k = torch.cat([k for k, _ in steps], dim=2)
    expected_v = torch.cat([v for _, v in steps], dim=2)
    cache = KVCache()
    with torch.no_grad():
        ptrs = set()
        for k, v in steps:
            key, value = cache.update(0, k, v)
            ptrs.add(key.data_ptr())
    assert len(ptrs) == 1  # one buffer, filled in place
    assert torch.equal(cache.layers[0].key, expected_k) and torch.equal(cache.layers[0].value, expected_v)
    assert len(cache) == 10
    # A caller may replace an entry (a prefix seeds the cache): the next update starts from it.
    cache.layers[0] = LayerKV(expected_k[:, :, :2], expected_v[:, :, :2])
    with torch.no_grad():
        key, _ = cache.update(0, *steps[1])
    assert torch.equal(key, torch.cat([expected_k[:, :, :2], steps[1][0]], dim=2))
    # With autograd on, nothing is written in place: tensors saved for backward stay valid.
    cache = KVCache()
    k0 = steps[0][0].clone().requires_grad_()
    key, _ = cache.update(0, k0, steps[0][1])
    loss = (key * 2).sum() + cache.update(0, *steps[1])[0].sum()
    loss.backward()
    assert torch.equal(k0.grad, torch.full_like(k0, 3.0))


def test_attention_with_dropout_equals_its_definition() -> None:
    torch.manual_seed(0)
    B, H, T, S, hd, p = 2, 3, 5, 7, 4, 0.3
    q, k, v = (torch.randn(B, H, n, hd, dtype=torch.float64, requires_grad=True) for n in (T, S, S))
    mask = attention_mask(torch.tensor([[False] * S, [True, True] + [False] * (S - 2)]), T, past_len=S - T)
    torch.manual_seed(1)
    out = AttentionWithDropout.apply(q, k, v, mask, False, p)
    torch.manual_seed(1)
    _, keep = torch.native_dropout(torch.ones(B, H, T, S, dtype=torch.float64), p, True)  # the same draws
    probs = torch.softmax((q @ k.transpose(-2, -1) / math.sqrt(hd)).masked_fill(~mask, -math.inf), dim=-1)
    reference = (probs * keep / (1 - p)) @ v
    torch.testing.assert_close(out, reference)
    grad = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, (q, k, v), grad),
                               torch.autograd.grad(reference, (q, k, v), grad))
    # Causal, without dropout: SDPA's own result.
    q2 = torch.randn(B, H, S, hd, dtype=torch.float64)
    causal = AttentionWithDropout.apply(q2, k, v, None, True, 1e-12)
    torch.testing.assert_close(causal, F.scaled_dot_product_attention(q2, k, v, is_causal=True))


def test_training_attention_on_cpu_takes_the_lean_path_and_learns() -> None:
    layer = _layer(attention_dropout=0.5).train()
    x = torch.randn(2, 6, 32, requires_grad=True)
    out = layer(x, None, is_causal=True)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x, None, is_causal=True)
    float_squares = [t for t in saved if t.dim() == 4 and t.shape[-1] == t.shape[-2] == 6 and t.is_floating_point()]
    assert len(float_squares) <= 1  # the probabilities; the dropout mask is bool


def test_relu_and_dropout_keep_byte_masks_and_have_the_same_gradients() -> None:
    x = torch.randn(4, 16, requires_grad=True)
    grad = torch.randn(4, 16)
    (ours,) = torch.autograd.grad(ReluKeepingMask.apply(x), x, grad)
    (reference,) = torch.autograd.grad(F.relu(x), x, grad)
    assert torch.equal(ours, reference)
    dropout = Dropout(0.25).train()
    out = dropout(x)
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / 0.75)
    (g,) = torch.autograd.grad(out, x, grad)
    torch.testing.assert_close(g, torch.where(kept, grad / 0.75, torch.zeros_like(grad)))
    assert torch.equal(dropout.eval()(x), x)


def test_selected_cache_rows_keep_writing_in_place() -> None:
    g = torch.Generator().manual_seed(2)
    k0, v0 = torch.randn(3, 2, 4, 8, generator=g), torch.randn(3, 2, 4, 8, generator=g)
    k1, v1 = torch.randn(2, 2, 1, 8, generator=g), torch.randn(2, 2, 1, 8, generator=g)
    rows = torch.tensor([2, 0])
    with torch.no_grad():
        cache = KVCache()
        cache.update(0, k0, v0)
        picked = cache.index_select(rows)
        assert torch.equal(picked.layers[0].key, k0[rows]) and len(picked) == 4
        ptr = picked.layers[0].key.data_ptr()
        key, value = picked.update(0, k1, v1)
    assert key.data_ptr() == ptr  # written into the selected buffer's spare room
    assert torch.equal(key, torch.cat([k0[rows], k1], dim=2)) and torch.equal(value, torch.cat([v0[rows], v1], dim=2))
    assert torch.equal(cache.layers[0].key, k0)  # the original is untouched


def test_silu_gate_keeps_its_inputs_only_and_has_autograd_gradients() -> None:
    g = torch.Generator().manual_seed(3)
    gate = torch.randn(2, 5, 24, dtype=torch.float64, generator=g, requires_grad=True)
    up = torch.randn(2, 5, 24, dtype=torch.float64, generator=g, requires_grad=True)
    grad = torch.randn(2, 5, 24, dtype=torch.float64, generator=g)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ours = SiluGate.apply(gate, up)
    assert len(saved) == 2  # gate and up; autograd's own keeps silu(gate) too
    reference = F.silu(gate) * up
    assert torch.equal(ours, reference)
    for a, b in zip(torch.autograd.grad(ours, (gate, up), grad), torch.autograd.grad(reference, (gate, up), grad)):
        assert torch.equal(a, b)  # autograd's kernels in autograd's order
    # Only the gradients asked for: a frozen up projection's output needs none.
    (only_gate,) = torch.autograd.grad(SiluGate.apply(gate, up.detach()), gate, grad)
    (expected,) = torch.autograd.grad(F.silu(gate) * up, gate, grad)
    assert torch.equal(only_gate, expected)


def test_swiglu_in_training_takes_the_lean_gate_with_the_same_values() -> None:
    torch.manual_seed(0)
    ffn = SwiGLU(16, 40).requires_grad_(False)  # a frozen backbone's FFN, its input trained (a deep prompt's path)
    x = torch.randn(3, 4, 16, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = ffn(x)
    activations = [tuple(t.shape) for t in saved if t.shape[:2] == (3, 4)]  # the rest are the weights (no copies)
    assert activations == [(3, 4, 40), (3, 4, 40)]  # gate and up, nothing more
    h = F.silu(ffn.gate_proj(x)) * ffn.up_proj(x)
    reference = ffn.down_proj(h)
    assert torch.equal(out, reference)
    grad = torch.randn_like(out)
    assert torch.equal(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(reference, x, grad)[0])


def test_records_grad_asks_grad_mode_and_every_tensor() -> None:
    frozen, trained = torch.zeros(2), torch.zeros(2, requires_grad=True)
    assert records_grad(frozen, trained) and records_grad(trained)
    assert not records_grad(frozen) and not records_grad()
    with torch.no_grad():
        assert not records_grad(trained)
    with torch.inference_mode():
        assert not records_grad(trained)
