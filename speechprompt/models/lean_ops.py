"""Memory-lean autograd functions of the shared transformer layer: the same values as the plain ops, less kept for
backward. ReLU and dropout keep 1-byte masks instead of float tensors, SwiGLU's gate keeps its two inputs and not the
activation as well, and attention with dropout on a CPU keeps a byte mask and the log-sum-exp instead of three
``(B, H, T, S)`` float tensors (flash attention's trade: recompute the probabilities in backward).
The layer's modules (:mod:`speechprompt.models.transformer`, SwiGLU in :mod:`speechprompt.models.layer_parts`) decide
when each applies, and only where :func:`records_grad` says autograd will keep something."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def records_grad(*tensors: Tensor) -> bool:
    """Whether autograd records an op on ``tensors`` (and so keeps tensors for its backward): grad mode is on and
    one of them requires grad. Elsewhere the plain op keeps nothing, and a lean function would only cost a call."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class ReluKeepingMask(torch.autograd.Function):
    """ReLU whose backward keeps a 1-byte mask, where autograd's own relu keeps its float output.

    When ``fc2`` is frozen it saves nothing of its input (a frozen weight needs no gradient), so the FFN's largest
    activation, ``(B, T, ffn_dim)``, was kept only for relu's backward: this keeps a quarter of it. Exact: the
    gradient passes where the output is positive, as ``threshold_backward``.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:
        out = F.relu(x)
        ctx.save_for_backward(out > 0)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        (positive,) = ctx.saved_tensors
        return torch.where(positive, grad, grad.new_zeros(()))


class SiluGate(torch.autograd.Function):
    """SwiGLU's gate, ``silu(gate) * up``, keeping only ``gate`` and ``up`` for backward.

    Autograd keeps three ``(B, T, ffn_dim)`` tensors for ``F.silu(gate) * up``: ``gate`` (silu's backward),
    ``silu(gate)`` and ``up`` (the product's). The activation is recomputed from ``gate`` in backward instead, which
    takes a third off the FFN's activations of LLaMA/Qwen2 layers (the largest share of what a frozen backbone keeps
    for a deep prompt's backward). The same forward ops and the same backward kernels, so the same values and
    gradients, bit for bit; the price is one more ``silu`` in backward.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        gate, up = ctx.saved_tensors
        # autograd's own kernels in autograd's order (the product's backward, then silu's): the same gradients, bit
        # for bit, and no more temporaries than autograd's
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose backward keeps a 1-byte mask: on CPU, ``F.dropout`` multiplies by a float noise tensor
    and autograd keeps it (4 bytes per element); ``native_dropout`` (what CUDA already runs) keeps a bool mask. Same
    distribution and scaling; a different draw from the generator than ``F.dropout`` for the same seed."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.inplace:
            return super().forward(x)
        return torch.native_dropout(x, self.p, True)[0]


class AttentionWithDropout(torch.autograd.Function):
    """Softmax attention with dropout on the probabilities, for training on a CPU: ``(B, H, T, hd)`` queries,
    ``(B, H, S, hd)`` keys and values, a boolean ``attn_mask`` (True = may attend), a float one (added to the
    scores, as SDPA does) or ``is_causal``.

    SDPA has no fused CPU kernel with dropout, and its math fallback keeps three ``(B, H, T, S)`` float tensors for
    backward (the probabilities, the dropout noise and the dropped probabilities). This keeps a 1-byte dropout mask
    and the ``(B, H, T)`` log-sum-exp of the scores, and recomputes the probabilities in backward from the queries
    and keys it keeps anyway (one ``q k^T`` more, as flash attention does). Same distribution as SDPA's dropout, the
    same values up to rounding. Every query must be allowed at least one key (the toolkit's masks always allow a
    query its own position).
    """

    @staticmethod
    def _scores(q: Tensor, k: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
        """``(B, H, T, S)`` scaled scores, ``-inf`` where attention is not allowed."""
        scores = torch.matmul(q, k.transpose(-2, -1)).mul_(q.shape[-1] ** -0.5)
        if is_causal:
            causal_out = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu_(1)
            scores.masked_fill_(causal_out, float("-inf"))
        elif mask is not None and mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
        elif mask is not None:  # a float mask: a bias (WavLM's), -inf where forbidden
            scores.add_(mask)
        return scores

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                is_causal: bool, p: float) -> Tensor:
        scores = AttentionWithDropout._scores(q, k, mask, is_causal)
        probs = torch.softmax(scores, dim=-1)
        # The log-sum-exp from the fused softmax's result: p_max = exp(s_max - lse), and p_max >= 1/S is far from 0.
        lse = scores.amax(dim=-1, keepdim=True).sub_(probs.amax(dim=-1, keepdim=True).log_())  # (B, H, T, 1)
        del scores
        dropped, keep = torch.native_dropout(probs, p, True)  # keep: bool (B, H, T, S)
        del probs
        out = torch.matmul(dropped, v)  # (B, H, T, hd)
        ctx.save_for_backward(q, k, v, lse, keep, mask)
        ctx.is_causal, ctx.p = is_causal, p
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, lse, keep, mask = ctx.saved_tensors
        probs = AttentionWithDropout._scores(q, k, mask, ctx.is_causal).sub_(lse).exp_()
        inv_keep = 1.0 / (1.0 - ctx.p)
        dq = dk = dv = None
        if ctx.needs_input_grad[2]:
            dropped = torch.ops.aten.native_dropout_backward(probs, keep, inv_keep)
            dv = torch.matmul(dropped.transpose(-2, -1), grad)
            del dropped
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dprobs = torch.ops.aten.native_dropout_backward(torch.matmul(grad, v.transpose(-2, -1)), keep, inv_keep)
            # softmax backward: p * (dp - sum(dp * p)), then the score scale.
            dscores = dprobs.sub_((dprobs * probs).sum(-1, keepdim=True)).mul_(probs).mul_(q.shape[-1] ** -0.5)
            if ctx.needs_input_grad[0]:
                dq = torch.matmul(dscores, k)
            if ctx.needs_input_grad[1]:
                dk = torch.matmul(dscores.transpose(-2, -1), q)
        return dq, dk, dv, None, None, None
