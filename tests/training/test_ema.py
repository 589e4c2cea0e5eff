"""The moving average of trained tensors, against a hand computation of the decay."""

from __future__ import annotations

import pytest
import torch

from speechprompt.training.ema import EMA, maybe_averaged


def test_the_average_follows_the_decay_exactly() -> None:
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    ema = EMA([p, p], decay=0.75)  # a tensor listed twice counts once
    assert len(ema.params) == 1
    expected = p.detach().clone()
    for value in ([3.0, 0.0], [-1.0, 4.0], [0.5, 0.5]):
        with torch.no_grad():
            p.copy_(torch.tensor(value))
        ema.update()
        expected = 0.75 * expected + 0.25 * torch.tensor(value)  # avg <- d * avg + (1 - d) * p
        torch.testing.assert_close(ema.average[0], expected, rtol=0, atol=1e-7)
    # By hand: 1 -> 0.75*1 + 0.25*3 = 1.5 -> 0.75*1.5 - 0.25 = 0.875 -> 0.75*0.875 + 0.125 = 0.78125
    assert ema.average[0][0].item() == pytest.approx(0.78125)


def test_averaged_swaps_in_the_average_and_restores_the_live_tensors() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.5)
    with torch.no_grad():
        p.fill_(2.0)
    ema.update()  # average: 1.0
    with maybe_averaged(ema):
        assert p.tolist() == [1.0] * 3
    assert p.tolist() == [2.0] * 3
    with pytest.raises(RuntimeError), ema.averaged():
        raise RuntimeError  # restored on an exception too
    assert p.tolist() == [2.0] * 3
    with maybe_averaged(None):
        assert p.tolist() == [2.0] * 3


def test_state_round_trip_and_a_mismatched_state_is_refused() -> None:
    p = torch.nn.Parameter(torch.randn(4))
    ema = EMA([p], decay=0.9)
    ema.average[0].fill_(7.0)
    other = EMA([torch.nn.Parameter(torch.zeros(4))], decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.average[0].tolist() == [7.0] * 4
    with pytest.raises(ValueError, match="does not fit"):
        EMA([torch.nn.Parameter(torch.zeros(5))], 0.9).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="decay"):
        EMA([p], 1.0)
