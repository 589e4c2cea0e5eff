"""The training state file and the one resume policy every trainer follows.

``run_dir/train_state.pt`` holds everything the next update depends on: the trained tensors, the optimizer (and
gradient scaler, moving average), the loop position, early-stopping state and the RNG of every process. It is
written atomically (a temporary file renamed over the old one), so a run killed at any moment leaves either the
previous state or the new one, never half a file; the rename is what commits a step.

The file is tagged with the trainer that wrote it (``kind``: ``train``, ``superb``, ``pretrain-ulm``) and a format
number, and read back with ``torch.load(weights_only=True)``: it holds only tensors and plain values, so reading it
cannot run code.

Resume policy (``resume`` in every trainer's config):

==========  ==================================================================================================
``auto``    continue from the state if ``run_dir`` has one (the default: rerunning a killed command resumes it)
``true``    continue from the state; a ``run_dir`` without one is an error
``false``   start afresh; a ``run_dir`` that holds a state is an error (another run is never overwritten)
==========  ==================================================================================================

Either way, a state is only resumed by the trainer that wrote it, and only with a config that computes the same
run: a key that differs (other than those the trainer lets change, like ``threads`` or ``max_steps``) is refused
with its dotted name and both values.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Any

import torch

from speechprompt.config import ConfigError, first_difference
from speechprompt.errors import CheckpointError
from speechprompt.fileio import torch_save

STATE_FILE = "train_state.pt"


class ResumeMode(str, enum.Enum):
    """What a trainer does with an existing ``train_state.pt`` (see the module docstring)."""

    AUTO = "auto"
    TRUE = "true"
    FALSE = "false"


def save_state(path: str | os.PathLike, kind: str, version: int, **payload: Any) -> None:
    """Write ``payload`` (tensors and plain values only) tagged with ``kind`` and ``version``, atomically."""
    torch_save({"kind": kind, "format": version, **payload}, path)


def load_state(path: str | os.PathLike, kind: str, version: int) -> dict[str, Any]:
    """Read a state written by :func:`save_state` for trainer ``kind`` in format ``version``.

    Raises:
        CheckpointError: the file is unreadable or corrupt, belongs to another trainer, or has another format.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or not a torch file: the user's remedy is the same
        raise CheckpointError(f"{path}: unreadable training state ({type(e).__name__}: {str(e)[:120]}); move it "
                              "away to start the run over") from None
    if not isinstance(state, dict) or "kind" not in state:
        raise CheckpointError(f"{path} is not a training state of this speechprompt version; use another run_dir "
                              "or move the file away")
    if state["kind"] != kind:
        raise CheckpointError(f"{path} belongs to a `speechprompt {state['kind']}` run, not `{kind}`: use another "
                              "run_dir")
    if state.get("format") != version:
        raise CheckpointError(f"{path} has training-state format {state.get('format')}, this speechprompt reads "
                              f"{version}; finish that run with the version that started it, or use another run_dir")
    return state


def resume_state(
    run_dir: str | os.PathLike,
    kind: str,
    version: int,
    config: dict[str, Any],
    may_change: set[str],
    resume: ResumeMode,
) -> dict[str, Any] | None:
    """Apply the resume policy to ``run_dir``: the saved state to continue from, or ``None`` to start afresh.

    Args:
        config: this run's resolved config (a plain dict, as :func:`speechprompt.config.to_dict` gives).
        may_change: top-level config keys that may differ from the saved run's (they change nothing an update
            computes: threads, device, logging intervals, ...).

    Raises:
        ConfigError: ``resume=true`` without a state, ``resume=false`` with one, or a config that changes the run.
        CheckpointError: the state is unreadable or another trainer's (see :func:`load_state`).
    """
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        if resume is ResumeMode.TRUE:
            raise ConfigError(f"resume=true but {path} does not exist: nothing to resume (resume=auto starts afresh)")
        return None
    if resume is ResumeMode.FALSE:
        raise ConfigError(f"{path} holds an earlier run and resume=false never overwrites one: use another run_dir, "
                          "resume=auto to continue that run, or move the file away to start over")
    state = load_state(path, kind, version)
    check_same_run(state["config"], config, may_change, path)
    return state


def check_same_run(saved: dict[str, Any], config: dict[str, Any], may_change: set[str], path: Path) -> None:
    """Refuse a config that differs from the saved run's in a key outside ``may_change``.

    Raises:
        ConfigError: naming the first differing key (dotted) and both values.
    """
    changed = first_difference(saved, config, may_change)
    if changed is not None:
        key, was, now = changed
        raise ConfigError(f"{path} was saved by a run with {key}={was!r}, but this config has {now!r}; a resumed run "
                          "must compute the same updates: use another run_dir, or resume=false in a new one")
