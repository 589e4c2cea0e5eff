"""LR schedules: warmup and decay values, the optimizer config's rate, and parity with fairseq's schedulers (run as
an oracle in its own environment, see tests/oracle.py)."""

from __future__ import annotations

import pytest
import torch
from oracle import run_oracle

from speechprompt.training.optim import OptimConfig
from speechprompt.training.schedule import SCHEDULES, constant, cosine, get_schedule, inverse_sqrt, lr_at


def test_warmup_is_linear_and_reaches_the_peak_on_the_last_warmup_update() -> None:
    for fn in SCHEDULES.values():
        values = [fn(s, 4, 100, 0.0) for s in range(4)]
        assert values == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_constant_stays_at_the_peak() -> None:
    assert [constant(s, 2) for s in range(2, 50, 7)] == [1.0] * 7
    assert constant(0, 0) == 1.0  # no warmup: the first update is at the peak


def test_inverse_sqrt_decays_as_one_over_root_n() -> None:
    w = 10
    assert inverse_sqrt(w - 1, w) == 1.0
    assert inverse_sqrt(4 * w - 1, w) == pytest.approx(0.5)  # the 40th update: sqrt(10 / 40)
    assert inverse_sqrt(100 * w - 1, w) == pytest.approx(0.1)
    assert inverse_sqrt(8, 0) == pytest.approx(1 / 3)  # no warmup: 1 / sqrt(9) for the 9th update


def test_cosine_goes_from_peak_to_floor_and_stays() -> None:
    w, total, floor = 10, 110, 0.1
    assert cosine(w - 1, w, total, floor) == 1.0
    assert cosine(w - 1 + 50, w, total, floor) == pytest.approx(floor + (1 - floor) / 2)  # half way
    assert cosine(total - 1, w, total, floor) == pytest.approx(floor)
    assert cosine(total + 500, w, total, floor) == pytest.approx(floor)
    decay = [cosine(s, w, total, floor) for s in range(w, total)]
    assert all(a > b for a, b in zip(decay, decay[1:]))


def test_lr_at_scales_the_peak_and_unknown_names_fail() -> None:
    assert lr_at("inverse_sqrt", 39, 2e-3, warmup_steps=10) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="unknown LR schedule 'linear'"):
        get_schedule("linear")


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_optim_config_rate_is_lr_at_with_decay_steps_over_the_run(name: str) -> None:
    cfg = OptimConfig(lr=0.5, schedule=name, warmup_steps=3, min_lr_ratio=0.2)
    assert [cfg.lr_at(s, 20) for s in range(25)] == [lr_at(name, s, 0.5, 3, 20, 0.2) for s in range(25)]
    fixed = OptimConfig(lr=0.5, schedule=name, warmup_steps=3, min_lr_ratio=0.2, decay_steps=20)
    assert [fixed.lr_at(s, 999) for s in range(25)] == [lr_at(name, s, 0.5, 3, 20, 0.2) for s in range(25)]


# fairseq's schedulers, as the oracle runs them (tests/oracles/fairseq/schedule.py): with warmup_init_lr=0 fairseq's
# warmup is linear from 0 as ours (its default starts at min_lr instead).
FAIRSEQ_SCHEDULES = {
    "inverse_sqrt": dict(scheduler="inverse_sqrt", warmup_updates=8, warmup_init_lr=0.0, lr=[5e-4], updates=60),
    "cosine": dict(scheduler="cosine", warmup_updates=5, warmup_init_lr=0.0, lr=[1e-3], min_lr=1e-4, max_update=50,
                   updates=50),
}


@pytest.fixture(scope="module")
def fairseq_rates(tmp_path_factory) -> dict[str, list[float]]:
    """fairseq's rate for the update after ``n`` finished updates, n = 1..updates, for each of
    :data:`FAIRSEQ_SCHEDULES`."""
    out = run_oracle("fairseq", "schedule", tmp_path_factory.mktemp("fairseq_rates"), **FAIRSEQ_SCHEDULES)
    return torch.load(out / "rates.pt", weights_only=True)


@pytest.mark.fairseq
def test_inverse_sqrt_equals_fairseq_shifted_by_one_update(fairseq_rates) -> None:
    theirs = fairseq_rates["inverse_sqrt"]
    assert len(theirs) == 60
    ours = [lr_at("inverse_sqrt", s, 5e-4, warmup_steps=8) for s in range(60)]
    assert ours == pytest.approx(theirs, rel=1e-12)


@pytest.mark.fairseq
def test_cosine_equals_fairseq_after_warmup(fairseq_rates) -> None:
    theirs = fairseq_rates["cosine"]
    assert len(theirs) == 50
    ours = [lr_at("cosine", s, 1e-3, warmup_steps=5, total_steps=50, min_ratio=0.1) for s in range(50)]
    assert ours == pytest.approx(theirs, rel=1e-12)
