"""Which evaluation was best, and when to stop: NaN-safe, and saved with the training state."""

from __future__ import annotations

import dataclasses
import math
from typing import Any


@dataclasses.dataclass
class BestTracker:
    """Tracks the best dev value and the evaluations since it.

    A NaN (or infinite, when the wrong way) value is never best: it counts as an evaluation without improvement, so
    a run that diverges stops by patience instead of keeping a broken checkpoint.

    Args:
        higher_is_better: accuracy-like metrics (``True``) or loss-like ones.
        patience: stop after this many evaluations without improvement (0: never).
    """

    higher_is_better: bool
    patience: int = 0
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0

    def update(self, value: float, step: int) -> bool:
        """Record the evaluation at ``step``; ``True`` when it is the new best."""
        value = float(value)
        improved = not math.isnan(value) and (
            self.best is None or (value > self.best if self.higher_is_better else value < self.best)
        )
        if improved:
            self.best, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step, self.bad_evals = state["best"], state["best_step"], int(state["bad_evals"])
