"""fairseq's learning-rate schedulers, the oracle of tests/test_schedule.py.

Params (JSON): ``{NAME: {"scheduler": "inverse_sqrt" | "cosine", "updates": N, **config}}``: the fields of the
scheduler's config dataclass (``InverseSquareRootLRScheduleConfig``, ``CosineLRScheduleConfig``).

Writes ``rates.pt``: ``{NAME: [the rate fairseq's ``step_update(n)`` returns after n finished updates, for n = 1..N]}``
(Python floats, exactly as fairseq computes them).
"""

from __future__ import annotations

import torch
from common import setup
from fairseq.optim import FairseqOptimizer
from fairseq.optim.lr_scheduler.cosine_lr_scheduler import CosineLRSchedule, CosineLRScheduleConfig
from fairseq.optim.lr_scheduler.inverse_square_root_schedule import (
    InverseSquareRootLRScheduleConfig,
    InverseSquareRootSchedule,
)

SCHEDULERS = {
    "inverse_sqrt": (InverseSquareRootLRScheduleConfig, InverseSquareRootSchedule),
    "cosine": (CosineLRScheduleConfig, CosineLRSchedule),
}


class Optimizer(FairseqOptimizer):
    """The least a scheduler needs: an optimizer whose rate it sets."""

    def __init__(self) -> None:
        super().__init__(None)
        self._optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)


def main() -> None:
    out, params = setup()
    rates = {}
    for name, spec in params.items():
        spec = dict(spec)
        config_cls, scheduler_cls = SCHEDULERS[spec.pop("scheduler")]
        updates = spec.pop("updates")
        scheduler = scheduler_cls(config_cls(**spec), Optimizer())
        rates[name] = [float(scheduler.step_update(n)) for n in range(1, updates + 1)]
    torch.save(rates, out / "rates.pt")


if __name__ == "__main__":
    main()
