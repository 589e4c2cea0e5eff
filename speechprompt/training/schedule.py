"""Learning-rate schedules: linear warmup, then inverse square root, cosine, tri-stage, linear decay or constant.

Each schedule is a pure function of the update count that returns a *multiplier* of the peak learning rate, so a
trainer needs no scheduler state to resume: the step number is the whole state. :func:`lr_at` looks a schedule up
in :data:`SCHEDULES` by name; every trainer sets the rate of each update from it.

Convention: ``step`` is the number of updates already done, so the first update is taken with ``step=0``. Warmup
reaches the peak at the *end* of update ``warmup_steps`` (``(step + 1) / warmup_steps``), which is fairseq's
``inverse_sqrt`` shifted by one update: fairseq sets the rate from the count of finished updates, so its very
first update runs at ``warmup_init_lr = 0`` and does nothing but move Adam's moments.
"""

from __future__ import annotations

import math
from collections.abc import Callable

# (step, warmup_steps, total_steps, min_ratio) -> multiplier of the peak learning rate
Schedule = Callable[[int, int, int, float], float]


def _warmup(step: int, warmup_steps: int) -> float | None:
    """The warmup multiplier while warming up, else ``None``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    return None


def constant(step: int, warmup_steps: int = 0, total_steps: int = 0, min_ratio: float = 0.0) -> float:
    """Linear warmup to 1, then 1."""
    w = _warmup(step, warmup_steps)
    return 1.0 if w is None else w


def inverse_sqrt(step: int, warmup_steps: int = 0, total_steps: int = 0, min_ratio: float = 0.0) -> float:
    """Linear warmup to 1, then ``sqrt(warmup_steps / n)`` for the ``n``-th update (fairseq's ``inverse_sqrt``).

    Without warmup the decay starts at the first update: ``1 / sqrt(n)``.
    """
    w = _warmup(step, warmup_steps)
    if w is not None:
        return w
    return math.sqrt(max(warmup_steps, 1) / (step + 1))


def cosine(step: int, warmup_steps: int = 0, total_steps: int = 0, min_ratio: float = 0.0) -> float:
    """Linear warmup to 1, then a half cosine from 1 down to ``min_ratio`` at update ``total_steps``.

    Updates past ``total_steps`` stay at ``min_ratio``.
    """
    w = _warmup(step, warmup_steps)
    if w is not None:
        return w
    span = max(total_steps - warmup_steps, 1)
    progress = min((step + 1 - warmup_steps) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def tri_stage(step: int, warmup_steps: int = 0, total_steps: int = 0, min_ratio: float = 0.0) -> float:
    """Linear warmup to 1, hold at 1 until half of ``total_steps``, then an exponential decay to ``min_ratio`` at
    update ``total_steps`` (``min_ratio`` past it).

    With ``warmup_steps`` a tenth of the run this is fairseq's ``tri_stage`` with ``phase_ratio [0.1, 0.4, 0.5]``
    and ``final_lr_scale = min_ratio``, the schedule of its wav2vec 2.0 / HuBERT CTC fine-tuning configs (whose
    warmup starts at ``init_lr_scale`` 0.01 of the peak, here at ``1 / warmup_steps``). ``min_ratio`` 0 decays to 0
    in one step at the end: give it a positive floor.
    """
    w = _warmup(step, warmup_steps)
    if w is not None:
        return w
    decay_start = max(total_steps // 2, warmup_steps)
    if step < decay_start:
        return 1.0
    if min_ratio <= 0.0:
        return 1.0 if step + 1 < total_steps else 0.0
    progress = min((step + 1 - decay_start) / max(total_steps - decay_start, 1), 1.0)
    return math.exp(math.log(min_ratio) * progress)


def polynomial_decay(step: int, warmup_steps: int = 0, total_steps: int = 0, min_ratio: float = 0.0) -> float:
    """Linear warmup to 1, then a straight line down to ``min_ratio`` at update ``total_steps`` (fairseq's
    ``polynomial_decay`` with power 1, HuBERT's pretraining schedule, shifted by one update as ``inverse_sqrt``).

    Updates past ``total_steps`` stay at ``min_ratio``.
    """
    w = _warmup(step, warmup_steps)
    if w is not None:
        return w
    span = max(total_steps - warmup_steps, 1)
    progress = min((step + 1 - warmup_steps) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * (1.0 - progress)


SCHEDULES: dict[str, Schedule] = {
    "constant": constant,
    "inverse_sqrt": inverse_sqrt,
    "cosine": cosine,
    "tri_stage": tri_stage,
    "polynomial_decay": polynomial_decay,
}


def get_schedule(name: str) -> Schedule:
    """The schedule registered under ``name``; a clear ``ValueError`` for an unknown one."""
    try:
        return SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown LR schedule {name!r}; choose one of {sorted(SCHEDULES)}") from None


def lr_at(
    name: str, step: int, peak_lr: float, warmup_steps: int = 0, total_steps: int = 0, min_ratio: float = 0.0
) -> float:
    """The learning rate for the update taken at ``step`` (updates already done)."""
    return peak_lr * get_schedule(name)(step, warmup_steps, total_steps, min_ratio)

