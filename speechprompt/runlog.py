"""A tiny run logger: metrics as a CSV file written line by line, plus TensorBoard when it is installed.

The CSV is in long ("tidy") form, one metric per row: ``step,metric,value,time``. Trainers log different metrics
at different steps (train loss every few steps, dev perplexity now and then), and the long form takes any of them
without rewriting a header; ``pandas.read_csv(...).pivot(index="step", columns="metric", values="value")`` gives
the wide table. Every row is flushed as it is written, so ``tail -f`` follows a run and a killed run keeps what it
logged.

Example:
    >>> with RunLogger("exp/run1") as log:
    ...     log.log(10, train_loss=2.31, lr=1e-4)
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from speechprompt.fileio import write_text

logger = logging.getLogger(__name__)

CSV_NAME = "log.csv"
TENSORBOARD_DIR = "tensorboard"
_HEADER = ["step", "metric", "value", "time"]


def _summary_writer_class() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``, or ``None`` when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises ImportError when the tensorboard package is missing
        return None
    return SummaryWriter


class RunLogger:
    """Appends metrics to ``run_dir/log.csv`` and, if available, to TensorBoard event files in
    ``run_dir/tensorboard``.

    Args:
        run_dir: the run directory (created if needed).
        resume_from: when resuming a run that was saved after step ``resume_from``, rows logged after that step
            (by the run that was killed later on) are dropped first, so that the replayed steps are not logged
            twice. ``None`` keeps an existing log as it is and appends to it.
        tensorboard: ``None`` uses TensorBoard when it is importable; ``False`` never does; ``True`` requires it.
    """

    def __init__(self, run_dir: str | os.PathLike, resume_from: int | None = None, tensorboard: bool | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        writer_cls = _summary_writer_class() if tensorboard is not False else None
        if writer_cls is None and tensorboard:
            raise RuntimeError("tensorboard=True but tensorboard is not installed (pip install tensorboard)")
        self.path = self.run_dir / CSV_NAME
        if resume_from is not None and self.path.exists():
            self._truncate_after(resume_from)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = open(self.path, "a", encoding="utf-8", newline="")  # noqa: SIM115 (open until close())
        self._csv = csv.writer(self._file)
        if new:
            self._csv.writerow(_HEADER)
            self._file.flush()
        self._tb = writer_cls(log_dir=str(self.run_dir / TENSORBOARD_DIR)) if writer_cls is not None else None

    def _truncate_after(self, step: int) -> None:
        with open(self.path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
        kept = [r for r in rows[1:] if len(r) == len(_HEADER) and r[0].isdigit() and int(r[0]) <= step]
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(_HEADER)
        writer.writerows(kept)
        write_text(self.path, buf.getvalue())

    def log(self, step: int, **metrics: float) -> None:
        """Write one row per metric for update ``step`` and flush. Non-finite values are written as ``nan``/``inf``."""
        now = f"{time.time():.3f}"
        for name, value in metrics.items():
            value = float(value)
            self._csv.writerow([step, name, repr(value) if math.isfinite(value) else str(value), now])
            if self._tb is not None:
                self._tb.add_scalar(name, value, step)
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Close the CSV file and the TensorBoard writer. Safe to call twice."""
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_log(path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Read a ``log.csv`` back as ``{metric: [(step, value), ...]}`` in file order."""
    out: dict[str, list[tuple[int, float]]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            out.setdefault(row["metric"], []).append((int(row["step"]), float(row["value"])))
    return out
