"""What the two pretraining trainers (``pretrain-ulm``, ``pretrain-hubert``) share besides their config keys
(:class:`~speechprompt.training.config.PretrainOptions`): where a run is and how it resumes, the loader of the steps
still to train, its clock across sessions, the end of the run (``metrics.json`` and the learning curves) and the
command-line wrapper. Each trainer keeps its own loop, data and evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from speechprompt.config import describe, load_config
from speechprompt.fileio import write_json
from speechprompt.training.config import PretrainOptions
from speechprompt.training.optim import Updater, check_schedule_unchanged
from speechprompt.training.run import RunDir

C = TypeVar("C", bound=PretrainOptions)


@dataclasses.dataclass
class Position:
    """Where a run is; saved in ``train_state.pt`` (``position``) at every save."""

    step: int = 0
    best_dev_loss: float = math.inf
    best_step: int = -1
    seconds: float = 0.0  # training time of earlier sessions


def resume(run: RunDir, cfg: PretrainOptions, model: nn.Module, updater: Updater) -> Position:
    """The position to start from: step 0 for a new run; for a resumed one, its saved position, with the model's
    weights, the optimizer and this process's RNG state put back (the RNG last: building a model draws from it)."""
    if run.saved is None:
        return Position()
    saved = run.saved
    check_schedule_unchanged(cfg.optim(), saved["config"]["max_steps"], cfg.max_steps, saved["position"]["step"],
                             run.state_path)
    model.load_state_dict(saved["model"])
    updater.load_state_dict(saved["updater"])
    pos = Position(**saved["position"])
    run.restore_rng(saved)
    return pos


def step_loader(batches: torch.utils.data.Dataset, pos: Position, max_steps: int, num_workers: int,
                device: torch.device) -> torch.utils.data.DataLoader:
    """The batches of the steps still to train, ``pos.step`` to ``max_steps - 1``, loaded by ``num_workers``.

    ``batches[s]`` is update s's whole batch and depends on s alone (and the seed), so a run resumed at step s
    replays exactly, with any number of loader workers.
    """
    return torch.utils.data.DataLoader(
        batches, batch_size=None, sampler=range(pos.step, max_steps), num_workers=num_workers,
        pin_memory=device.type == "cuda",
        # Its own generator: an iterator would otherwise draw a seed from the global RNG, which a resumed run
        # would draw at a different step than an uninterrupted one.
        generator=torch.Generator(),
    )


class Clock:
    """The training time of a run over all its sessions: ``pos.seconds`` holds that of the saved steps.

    Args:
        pos: the run's position; :meth:`lap` adds to its ``seconds``.
    """

    def __init__(self, pos: Position) -> None:
        self.pos = pos
        self.session_start = self._mark = time.monotonic()

    def lap(self) -> None:
        """Count the time since the last lap into ``pos.seconds``: call it just before the position is saved, so
        that a resumed run goes on from the time of its saved step."""
        now = time.monotonic()
        self.pos.seconds, self._mark = self.pos.seconds + now - self._mark, now

    def read(self) -> tuple[float, float]:
        """The training time of all sessions up to now, and that of this session (seconds)."""
        now = time.monotonic()
        return self.pos.seconds + now - self._mark, now - self.session_start


def finish(run: RunDir, clock: Clock, metrics: dict[str, Any], speed: tuple[str, float], title: str) -> dict[str, Any]:
    """The run's final metrics: ``metrics``, then ``world_size``, ``wall_time_s`` (training time of all sessions)
    and this session's speed, ``speed[1]`` per second under the name ``speed[0]``. The main process writes them to
    ``metrics.json`` and plots ``learning_curves.png`` titled ``title``.
    """
    total, session = clock.read()
    name, amount = speed
    metrics = {**metrics, "world_size": run.dist.world_size, "wall_time_s": total, name: amount / max(session, 1e-9)}
    if run.dist.main:
        write_json(run.path / "metrics.json", metrics)
        run.plot_learning_curves(title)
    return metrics


# --------------------------------------------------------------------------------------------------------------
# CLI


def add_config_arguments(parser: argparse.ArgumentParser, config: type[PretrainOptions]) -> None:
    """``--config`` and ``key=value`` overrides, with every key of ``config`` listed in ``--help``."""
    parser.add_argument("--config", help="YAML config (keys below); key=value overrides are applied after it")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. max_steps=500")
    parser.epilog = "config keys:\n" + describe(config)


def run_command(args: argparse.Namespace, config: type[C], pretrain: Callable[[C], dict[str, Any]]) -> int:
    """Run ``pretrain`` on the config the arguments give, and print its metrics as one JSON line (one per run, not
    per process)."""
    metrics = pretrain(load_config(config, args.config, args.overrides))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics), file=sys.stdout, flush=True)
    return 0
