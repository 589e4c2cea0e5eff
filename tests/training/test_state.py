"""The training-state file and the one resume policy of every trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from speechprompt.config import ConfigError
from speechprompt.errors import CheckpointError
from speechprompt.training.state import STATE_FILE, ResumeMode, load_state, resume_state, save_state

CONFIG = {"lr": 0.1, "optim": {"betas": [0.9, 0.98]}, "threads": 1}


def _saved(run_dir: Path, kind: str = "train", version: int = 1, config: dict | None = None) -> Path:
    save_state(run_dir / STATE_FILE, kind, version, config=config or CONFIG, step=torch.tensor(3))
    return run_dir / STATE_FILE


def test_auto_starts_afresh_without_a_state_and_resumes_with_one(tmp_path: Path) -> None:
    assert resume_state(tmp_path, "train", 1, CONFIG, set(), ResumeMode.AUTO) is None
    _saved(tmp_path)
    state = resume_state(tmp_path, "train", 1, CONFIG, set(), ResumeMode.AUTO)
    assert state is not None and int(state["step"]) == 3 and state["kind"] == "train"


def test_true_needs_a_state_and_false_never_overwrites_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="resume=true but .*train_state.pt does not exist"):
        resume_state(tmp_path, "train", 1, CONFIG, set(), ResumeMode.TRUE)
    assert resume_state(tmp_path, "train", 1, CONFIG, set(), ResumeMode.FALSE) is None
    _saved(tmp_path)
    assert resume_state(tmp_path, "train", 1, CONFIG, set(), ResumeMode.TRUE) is not None
    with pytest.raises(ConfigError, match="holds an earlier run and resume=false never overwrites"):
        resume_state(tmp_path, "train", 1, CONFIG, set(), ResumeMode.FALSE)
    assert (tmp_path / STATE_FILE).is_file()  # refused, not deleted


def test_a_changed_config_is_refused_with_the_first_differing_key(tmp_path: Path) -> None:
    _saved(tmp_path)
    changed = {**CONFIG, "optim": {"betas": [0.9, 0.999]}}
    with pytest.raises(ConfigError, match=r"saved by a run with optim\.betas=\[0\.9, 0\.98\], but this config has "
                                          r"\[0\.9, 0\.999\]"):
        resume_state(tmp_path, "train", 1, changed, set(), ResumeMode.AUTO)
    # Keys the trainer lets change are not compared.
    assert resume_state(tmp_path, "train", 1, {**CONFIG, "threads": 2}, {"threads"}, ResumeMode.AUTO) is not None


def test_another_trainers_state_is_never_taken_over(tmp_path: Path) -> None:
    _saved(tmp_path, kind="superb")
    with pytest.raises(CheckpointError, match="belongs to a `speechprompt superb` run, not `train`"):
        resume_state(tmp_path, "train", 1, CONFIG, set(), ResumeMode.AUTO)


def test_corrupt_truncated_foreign_and_other_version_states_are_clear_errors(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="unreadable training state .*move it away"):
        load_state(path, "train", 1)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="unreadable training state"):
        load_state(path, "train", 1)
    torch.save({"step": 3}, path)
    with pytest.raises(CheckpointError, match="not a training state of this speechprompt version"):
        load_state(path, "train", 1)
    _saved(tmp_path, version=7)
    with pytest.raises(CheckpointError, match="format 7, this speechprompt reads 1"):
        load_state(path, "train", 1)


def test_a_state_is_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save killed before its rename leaves the previous state whole (the rename commits a step)."""
    path = _saved(tmp_path)
    before = path.read_bytes()

    def die(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("os.replace", die)
    with pytest.raises(KeyboardInterrupt):
        save_state(path, "train", 1, config=CONFIG, step=torch.tensor(4))
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary file is cleaned up
