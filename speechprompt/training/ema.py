"""An exponential moving average of trained tensors (Polyak averaging).

After every update ``avg <- decay * avg + (1 - decay) * param``. Noisy updates (prompt tuning with small batches)
average out: the average is what a trainer evaluates on dev and saves in checkpoints, while training itself goes on
from the live tensors. With ``decay = 0.98`` the average spans roughly the last 50 updates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor


class EMA:
    """The moving average of ``params`` (each tensor once, in the given order).

    Args:
        params: the trained tensors; the average starts equal to them.
        decay: in ``[0, 1)``; the weight the old average keeps at each update.
    """

    def __init__(self, params: Iterable[Tensor], decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.params = list({id(p): p for p in params}.values())
        self.decay = decay
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current tensors into the average (after an optimizer step)."""
        for avg, p in zip(self.average, self.params):
            avg.lerp_(p.detach(), 1.0 - self.decay)

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """The average in place of the live tensors inside the block (evaluate, snapshot); restored after."""
        live = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, avg in zip(self.params, self.average):
                p.copy_(avg)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, x in zip(self.params, live):
                    p.copy_(x)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "average": [a.detach().cpu() for a in self.average]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["average"]
        if len(saved) != len(self.average) or any(s.shape != a.shape for s, a in zip(saved, self.average)):
            raise ValueError("the saved moving average does not fit these tensors")
        with torch.no_grad():
            for avg, s in zip(self.average, saved):
                avg.copy_(s)


@contextlib.contextmanager
def maybe_averaged(ema: EMA | None) -> Iterator[None]:
    """:meth:`EMA.averaged` when there is a moving average, else nothing."""
    if ema is None:
        yield
    else:
        with ema.averaged():
            yield
