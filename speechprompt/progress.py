"""Progress of a long command: one live line on a terminal, a short log line every N steps in a log file.

On a terminal, a ``tqdm`` bar that redraws one line (log messages print above it). When stderr is not a terminal
(a batch job's log, ``nohup``, CI), carriage-return redraws would leave thousands of fragments in the file, so the
bar is replaced by an ordinary log line every ``every`` steps and at the end::

    12:01:07 INFO speechprompt.progress: train: 120/800 steps (15%), 2.31 steps/s, ETA 4m54s, loss 1.873

Example:
    >>> with Progress(800, "train", unit="steps") as bar:
    ...     for step in range(800):
    ...         bar.update(loss=1.873)
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from types import TracebackType
from typing import Any, TextIO

logger = logging.getLogger(__name__)


def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class Progress:
    """Counts steps of a loop of known length and shows it (see the module docstring).

    Args:
        total: steps in all.
        desc: what is counted, first on the line (e.g. the command name).
        unit: the step's name, plural (``steps``, ``files``, ``utt``).
        initial: steps already done (a resumed run).
        every: log-line interval when not on a terminal (default: every 5% of ``total``).
        enabled: ``False`` shows nothing (the non-main processes of a distributed run).
        stream: where the bar goes; a terminal gets the bar, anything else log lines.
    """

    def __init__(self, total: int, desc: str, unit: str = "steps", initial: int = 0, every: int | None = None,
                 enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total, self.desc, self.unit = int(total), desc, unit
        self.n = int(initial)
        self.every = max(1, every if every else math.ceil(self.total / 20) if self.total else 1)
        self.enabled = enabled
        self.postfix: dict[str, Any] = {}
        self._start_n, self._start = self.n, time.monotonic()
        stream = stream if stream is not None else sys.stderr
        self._bar = None
        self._redirect: contextlib.AbstractContextManager[Any] | None = None
        if enabled and _isatty(stream):
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(total=self.total, initial=self.n, desc=desc, unit=unit.rstrip("s") or unit,
                             dynamic_ncols=True, file=stream, leave=True)
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()

    def update(self, n: int = 1, **postfix: Any) -> None:
        """``n`` more steps done; ``postfix`` values (loss, lr, ...) are shown after the count."""
        if not self.enabled:
            return
        self.n += n
        self.postfix.update(postfix)
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: _fmt_value(v) for k, v in self.postfix.items()}, refresh=False)
            self._bar.update(n)
        elif self.n % self.every < n or self.n == self.total:
            logger.info("%s", self.line())

    def line(self) -> str:
        """The log line for the current count: ``desc: n/total unit (p%), rate, ETA, postfix``."""
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = (self.n - self._start_n) / elapsed
        eta = (self.total - self.n) / rate if rate > 0 else math.inf
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = "".join(f", {k} {_fmt_value(v)}" for k, v in self.postfix.items())
        return (f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}, {rate:.3g} {self.unit}/s, "
                f"ETA {_fmt_seconds(eta)}{extra}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
