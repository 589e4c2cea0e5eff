"""One update from micro-batches: accumulation, normalisation, clipping, fp16 overflow, non-finite losses."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from speechprompt.config import ConfigError
from speechprompt.training.distributed import Dist
from speechprompt.training.optim import OptimConfig, TrainingError, Updater, check_schedule_unchanged
from speechprompt.training.precision import MixedPrecision

CPU = torch.device("cpu")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _data(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    return nn.functional.cross_entropy(model(x), y, reduction="sum"), len(y)


def _updater(model: nn.Module, precision: str = "fp32", **optim: object) -> Updater:
    return Updater(model.parameters(), OptimConfig(lr=0.1, **optim), MixedPrecision(precision, CPU), Dist())


def test_micro_batches_take_the_update_of_their_whole_batch() -> None:
    x, y = _data()
    whole, split = _model(), _model()
    a, b = _updater(whole), _updater(split)
    a.backward(*_loss(whole, x, y))
    stats_a = a.step(0.1)
    for lo, hi in ((0, 1), (1, 4), (4, 6)):  # uneven micro-batches: the step normalises by all 6 terms
        b.backward(*_loss(split, x[lo:hi], y[lo:hi]))
    stats_b = b.step(0.1)
    assert stats_a.terms == stats_b.terms == 6
    assert stats_a.loss == pytest.approx(stats_b.loss, rel=1e-6)
    assert stats_a.loss == pytest.approx(nn.functional.cross_entropy(_model()(x), y).item(), rel=1e-6)
    for p, q in zip(whole.parameters(), split.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert p.grad is None  # gradients are cleared for the next update


def test_the_gradient_norm_is_reported_before_clipping_and_the_rate_is_set() -> None:
    x, y = _data()
    model = _model()
    up = _updater(model, clip=1e-3)
    up.backward(*_loss(model, x, y))
    reference = _model()
    nn.functional.cross_entropy(reference(x), y).backward()
    expected = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in reference.parameters()))
    stats = up.step(0.05)
    assert stats.grad_norm == pytest.approx(expected, rel=1e-5) and expected > 1e-3
    assert up.optimizer.param_groups[0]["lr"] == 0.05


def test_a_non_finite_loss_is_an_error_that_changes_nothing() -> None:
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    up = _updater(model)
    x, y = _data()
    total, terms = _loss(model, x, y)
    up.backward(total * float("nan"), terms)
    with pytest.raises(TrainingError, match="non-finite training loss"):
        up.step(0.1)
    assert all(torch.equal(p, b) and p.grad is None for p, b in zip(model.parameters(), before))


def test_an_update_without_loss_terms_is_skipped() -> None:
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    stats = _updater(model).step(0.1)
    assert stats.skipped and stats.terms == 0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_fp16_skips_an_overflowing_update_and_lowers_the_scale() -> None:
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    up = _updater(model, precision="fp16")
    scale = up.precision.scaler.get_scale()
    x, y = _data()
    total, terms = _loss(model, x, y)
    up.backward(total * 1e34, terms)  # times the loss scale, the gradients overflow
    stats = up.step(0.1)
    assert stats.skipped and up.precision.scaler.get_scale() < scale
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    up.backward(*_loss(model, x, y))
    assert not up.step(0.1).skipped
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_the_moving_average_follows_the_updates() -> None:
    model = _model()
    up = Updater(model.parameters(), OptimConfig(lr=0.1), MixedPrecision("fp32", CPU), Dist(), ema_decay=0.5)
    start = [p.detach().clone() for p in model.parameters()]
    x, y = _data()
    up.backward(*_loss(model, x, y))
    up.step(0.1)
    for avg, p, s in zip(up.ema.average, model.parameters(), start):
        torch.testing.assert_close(avg, 0.5 * s + 0.5 * p.detach())


def test_a_longer_run_may_not_change_the_rate_of_updates_already_taken() -> None:
    constant = OptimConfig(lr=1.0, warmup_steps=2)
    check_schedule_unchanged(constant, 10, 20, 8, "state")  # constant after warmup: any length
    cosine = OptimConfig(lr=1.0, schedule="cosine", warmup_steps=2)
    check_schedule_unchanged(cosine, 10, 20, 2, "state")  # still warming up: the decay has not started
    with pytest.raises(ConfigError, match="changes the learning rate of updates already taken"):
        check_schedule_unchanged(cosine, 10, 20, 3, "state")
    fixed = OptimConfig(lr=1.0, schedule="cosine", warmup_steps=2, decay_steps=10)
    check_schedule_unchanged(fixed, 10, 20, 9, "state")  # decay_steps pins the schedule
