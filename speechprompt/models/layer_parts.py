"""The interchangeable parts of the shared transformer layer: activations, RMSNorm, the SwiGLU FFN and rotary
positions (the pieces today's decoder LMs use in place of fairseq's LayerNorm, fc1/fc2 FFN and learned or
sinusoidal positions)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechprompt.models.lean_ops import SiluGate, records_grad

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    # fairseq's "gelu_accurate" is the tanh approximation.
    "gelu_accurate": lambda x: F.gelu(x, approximate="tanh"),
    "tanh": torch.tanh,
    "linear": lambda x: x,
    "silu": F.silu,
}


class RMSNorm(nn.Module):
    """Root-mean-square LayerNorm (LLaMA, Qwen2): ``x / rms(x) * weight``, no mean and no bias.

    Computed in float32 whatever the input dtype and cast back before the weight, as the LLaMA family's reference
    does: a bf16 backbone then normalises exactly as its authors' code.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """``(..., D)`` -> ``(..., D)``."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class SwiGLU(nn.Module):
    """The gated FFN of LLaMA and Qwen2: ``down_proj(act(gate_proj(x)) * up_proj(x))``, ``(B, T, D)`` in and out.

    The three projections are plain ``nn.Linear`` children, so LoRA and masks target them by name (``gate_proj``,
    ``up_proj``, ``down_proj``) as they do ``fc1``/``fc2``.
    """

    def __init__(self, embed_dim: int, ffn_dim: int, activation: str = "silu", bias: bool = False) -> None:
        super().__init__()
        self.activation = activation
        self.gate_proj = nn.Linear(embed_dim, ffn_dim, bias=bias)
        self.up_proj = nn.Linear(embed_dim, ffn_dim, bias=bias)
        self.down_proj = nn.Linear(ffn_dim, embed_dim, bias=bias)

    def forward(self, x: Tensor, dropout: nn.Module | None = None) -> Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)  # (B, T, ffn_dim) each
        if self.activation == "silu" and records_grad(gate, up):
            h = SiluGate.apply(gate, up)  # keeps gate and up for backward, not silu(gate) as well
        else:
            h = ACTIVATIONS[self.activation](gate) * up
        return self.down_proj(h if dropout is None else dropout(h))


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``(B, H, T, hd)`` by per-position angles, ``cos``/``sin`` ``(B, T, hd)`` (the "rotate half"
    layout of the LLaMA family: dimension ``i`` pairs with ``i + hd/2``). A position with ``cos = 1, sin = 0`` is
    left as it is: that is how prompt positions, which have no position, pass through."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (B, 1, T, hd)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
