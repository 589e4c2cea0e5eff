"""The run logger: long-form CSV flushed per row, truncation on resume, and the optional TensorBoard writer."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from speechprompt import runlog
from speechprompt.runlog import RunLogger, read_log


def test_rows_are_flushed_as_they_are_logged(tmp_path: Path) -> None:
    log = RunLogger(tmp_path / "run", tensorboard=False)
    log.log(10, train_loss=2.5, lr=1e-3)
    # Readable before close: a killed run keeps what it logged.
    assert read_log(tmp_path / "run" / "log.csv") == {"train_loss": [(10, 2.5)], "lr": [(10, 1e-3)]}
    log.log(20, dev_ppl=float("inf"))
    log.close()
    log.close()
    rows = read_log(tmp_path / "run" / "log.csv")
    assert rows["dev_ppl"] == [(20, math.inf)]
    assert (tmp_path / "run" / "log.csv").read_text().splitlines()[0] == "step,metric,value,time"


def test_resume_drops_rows_after_the_saved_step_and_appends(tmp_path: Path) -> None:
    with RunLogger(tmp_path, tensorboard=False) as log:
        for step in (5, 10, 15, 20):
            log.log(step, train_loss=float(step))
    with RunLogger(tmp_path, resume_from=10, tensorboard=False) as log:
        log.log(15, train_loss=-15.0)
    assert read_log(tmp_path / "log.csv")["train_loss"] == [(5, 5.0), (10, 10.0), (15, -15.0)]
    with RunLogger(tmp_path, tensorboard=False) as log:  # resume_from=None keeps everything
        log.log(20, train_loss=-20.0)
    assert len(read_log(tmp_path / "log.csv")["train_loss"]) == 4
    with RunLogger(tmp_path, resume_from=-1, tensorboard=False) as log:  # a fresh start: an earlier try's rows go
        log.log(0, unigram_dev_loss=1.0)
    assert read_log(tmp_path / "log.csv") == {"unigram_dev_loss": [(0, 1.0)]}


class _FakeWriter:
    instances: list[_FakeWriter] = []

    def __init__(self, log_dir: str) -> None:
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        _FakeWriter.instances.append(self)

    def add_scalar(self, name: str, value: float, step: int) -> None:
        self.scalars.append((name, value, step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_tensorboard_receives_the_same_scalars_when_available(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(runlog, "_summary_writer_class", lambda: _FakeWriter)
    with RunLogger(tmp_path) as log:
        log.log(3, loss=1.5)
    writer = _FakeWriter.instances[-1]
    assert writer.log_dir == str(tmp_path / "tensorboard")
    assert writer.scalars == [("loss", 1.5, 3)] and writer.closed


def test_tensorboard_true_without_tensorboard_is_an_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(runlog, "_summary_writer_class", lambda: None)
    with pytest.raises(RuntimeError, match="tensorboard is not installed"):
        RunLogger(tmp_path, tensorboard=True)
    with RunLogger(tmp_path) as log:  # the default quietly goes without
        log.log(1, loss=1.0)
