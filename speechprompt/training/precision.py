"""Numeric precision of training: fp32, or autocast to bf16 / fp16 with fp32 master tensors.

Under ``bf16`` and ``fp16`` the forward runs in :func:`torch.autocast` (matrix products in the low precision,
reductions and the loss in fp32), while every trained tensor, its gradient and the optimizer state stay fp32: a
tuning method's few parameters lose nothing to rounding. ``fp16`` has a small exponent range, so its loss is
multiplied by a dynamic scale before the backward pass (:class:`torch.amp.GradScaler`) and the gradients are
unscaled before clipping; an update whose gradients overflowed is skipped and the scale lowered. ``bf16`` has fp32's
range and needs no scaling. Both run on CPU as well as CUDA (on a CPU, bf16 is mainly a memory saving).
"""

from __future__ import annotations

import contextlib
import enum
from typing import Any

import torch
from torch import Tensor


class Precision(str, enum.Enum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


_DTYPES = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


class MixedPrecision:
    """Autocast and loss scaling for one :class:`Precision` on one device."""

    def __init__(self, precision: Precision | str, device: torch.device) -> None:
        self.precision = Precision(precision)
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision is Precision.FP16)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context for forward passes (a no-op in fp32)."""
        if self.precision is Precision.FP32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])

    def scale(self, loss: Tensor) -> Tensor:
        """The loss to call ``backward`` on (scaled in fp16)."""
        return self.scaler.scale(loss)

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.scaler.load_state_dict(state)
