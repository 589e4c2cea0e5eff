"""Progress: one redrawn line on a terminal, a short log line every N steps elsewhere."""

from __future__ import annotations

import io
import logging

import pytest

from speechprompt.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_it_logs_a_line_every_n_steps(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger="speechprompt.progress"), \
            Progress(100, "train run1", unit="steps", every=25, stream=stream) as bar:
        for i in range(100):
            bar.update(loss=1.0 / (i + 1))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and stream.getvalue() == ""  # steps 25, 50, 75, 100; no carriage returns anywhere
    assert lines[0].startswith("train run1: 25/100 steps (25%), ") and "ETA" in lines[0]
    assert lines[-1].startswith("train run1: 100/100 steps (100%)") and lines[-1].endswith("loss 0.01")


def test_the_default_interval_is_five_percent_and_a_resumed_count_starts_where_it_was(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="speechprompt.progress"), \
            Progress(200, "x", initial=100, stream=io.StringIO()) as bar:
        for _ in range(100):
            bar.update()
    counts = [r.getMessage().split()[1] for r in caplog.records]
    assert counts == [f"{n}/200" for n in range(110, 201, 10)]


def test_on_a_terminal_it_is_one_bar(caplog: pytest.LogCaptureFixture) -> None:
    term = _Terminal()
    with caplog.at_level(logging.INFO, logger="speechprompt.progress"), Progress(50, "synth", stream=term) as bar:
        for _ in range(50):
            bar.update()
    assert not caplog.records  # no log lines: the bar is redrawn in place
    out = term.getvalue()
    assert "synth" in out and "50/50" in out and "\n" not in out.rstrip("\n")


def test_disabled_shows_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="speechprompt.progress"), \
            Progress(10, "rank1", every=1, enabled=False, stream=_Terminal()) as bar:
        for _ in range(10):
            bar.update()
    assert not caplog.records
