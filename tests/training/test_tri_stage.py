"""The tri_stage schedule against fairseq's tri-stage formula written out by hand (warmup 10%, hold 40%, decay 50%
exponentially to final_lr_scale), as its wav2vec 2.0 fine-tuning configs use it."""

from __future__ import annotations

import math

import pytest

from speechprompt.training.optim import OptimConfig
from speechprompt.training.schedule import tri_stage


def fairseq_tri_stage(n: int, total: int, final_scale: float) -> float:
    """fairseq's multiplier after ``n`` finished updates with phase_ratio [0.1, 0.4, 0.5] and init_lr_scale 0."""
    warmup, hold = int(0.1 * total), int(0.4 * total)
    decay = total - warmup - hold
    if n < warmup:
        return n / warmup
    if n < warmup + hold:
        return 1.0
    if n <= total:
        return math.exp(math.log(final_scale) / decay * (n - warmup - hold))
    return final_scale


@pytest.mark.parametrize("total", [100, 13000])
def test_tri_stage_follows_fairseq_phases(total):
    warmup = total // 10
    steps = [0, warmup - 1, warmup, total // 3, total // 2 - 1, total // 2, int(0.75 * total), total - 1, total + 5]
    for step in steps:
        # Ours gives the rate of the update taken after `step` updates; fairseq's after `step + 1` finished ones.
        assert tri_stage(step, warmup, total, 0.05) == pytest.approx(fairseq_tri_stage(step + 1, total, 0.05)), step
    assert tri_stage(total - 1, warmup, total, 0.05) == pytest.approx(0.05)
    assert tri_stage(total * 2, warmup, total, 0.05) == pytest.approx(0.05)


def test_tri_stage_through_the_optimizer_config():
    cfg = OptimConfig(lr=5e-5, schedule="tri_stage", warmup_steps=1300, min_lr_ratio=0.05)
    assert cfg.lr_at(1299, 13000) == pytest.approx(5e-5)
    assert cfg.lr_at(6000, 13000) == pytest.approx(5e-5)
    assert cfg.lr_at(12999, 13000) == pytest.approx(5e-5 * 0.05)
    assert cfg.lr_at(9749, 13000) == pytest.approx(5e-5 * math.sqrt(0.05))  # halfway through the decay
