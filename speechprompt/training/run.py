"""The plumbing of one training run, the same for every trainer: directory, lock, resume, state, log, progress.

A trainer opens its run directory with :class:`RunDir` and keeps its own loop::

    with RunDir(cfg.run_dir, "train", cfg, version=1, may_change=..., resume=cfg.resume, dist=d) as run:
        saved = run.saved                      # the state to continue from, or None (see training.state)
        ...build model, Updater, BestTracker; restore them from `saved`...
        with run.logger(step) as log, run.progress(total, step) as bar:
            ...the loop: log.log(...), bar.update(...), run.save_state(...) at evaluations...
        run.plot_learning_curves("title")

What it does for every trainer:

* **one writer**: the main process locks the directory (:class:`~speechprompt.lock.DirectoryLock`); a second
  process is refused at once with a message naming the holder. A killed holder's lock dies with it.
* **resume policy**: ``resume=auto|true|false`` and the same-run check (:func:`~speechprompt.training.state.
  resume_state`), on every process.
* ``config.yaml``: the resolved config, written by the main process.
* **state**: :meth:`RunDir.save_state` gathers the RNG state of every process and writes ``train_state.pt``
  atomically from the main process; :meth:`RunDir.restore_rng` puts this process's back.
* **logs**: ``log.csv`` (+ TensorBoard when installed) from the main process, truncated past the resumed step so a
  replayed step is logged once; a progress bar (:class:`~speechprompt.progress.Progress`); ``learning_curves.png``.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from speechprompt.config import save_config, to_dict
from speechprompt.lock import DirectoryLock, LockError
from speechprompt.progress import Progress
from speechprompt.rng import rng_state, set_rng_state
from speechprompt.runlog import RunLogger
from speechprompt.training.distributed import Dist
from speechprompt.training.state import STATE_FILE, ResumeMode, resume_state, save_state

logger = logging.getLogger(__name__)


class _NullLogger:
    """What the non-main processes log to."""

    def log(self, step: int, **metrics: float) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NullLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class RunDir:
    """A run directory opened for training (see the module docstring).

    Args:
        run_dir: the directory (created).
        kind: the trainer (``train``, ``superb``, ``pretrain-ulm``): a state is only resumed by its own kind.
        config: the run's config dataclass (saved as ``config.yaml``; compared with the saved run's).
        version: the trainer's training-state format.
        may_change: top-level config keys a resumed run may change.
        resume: the resume policy.
        dist: this process's place in the run.
    """

    def __init__(self, run_dir: str | os.PathLike, kind: str, config: Any, version: int, may_change: set[str],
                 resume: ResumeMode | str, dist: Dist | None = None) -> None:
        self.path = Path(run_dir)
        self.kind, self.config, self.version = kind, config, version
        self.may_change, self.resume = set(may_change), ResumeMode(resume)
        self.dist = dist or Dist()
        self.saved: dict[str, Any] | None = None
        self._lock = DirectoryLock(self.path, command=f"speechprompt {kind}")

    @property
    def state_path(self) -> Path:
        return self.path / STATE_FILE

    def __enter__(self) -> RunDir:
        error = None
        if self.dist.main:
            try:
                self._lock.acquire()
            except LockError as e:
                error = str(e)
        error = self.dist.broadcast_object(error)
        if error is not None:
            raise LockError(error)
        try:
            self.saved = resume_state(self.path, self.kind, self.version, to_dict(self.config), self.may_change,
                                      self.resume)
            self.dist.barrier()  # every process has read the state before the main one writes anything
            if self.dist.main:
                save_config(self.config, self.path / "config.yaml")
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._lock.release()

    # -- state ---------------------------------------------------------------------------------------------------

    def save_state(self, **payload: Any) -> None:
        """``train_state.pt`` with ``payload``, this run's config and every process's RNG state (call it on every
        process: the RNG states are gathered, then the main process writes)."""
        rngs = self.dist.all_gather_object(rng_state())
        if self.dist.main:
            save_state(self.state_path, self.kind, self.version, config=to_dict(self.config), rng=rngs, **payload)

    def restore_rng(self, saved: dict[str, Any]) -> None:
        """This process's RNG state from ``saved`` (call it last when resuming: building a model draws from it)."""
        rngs = saved["rng"]
        if len(rngs) != self.dist.world_size:
            logger.warning("resuming %d processes from a run of %d: dropout and shuffling will not replay exactly",
                           self.dist.world_size, len(rngs))
        set_rng_state(rngs[min(self.dist.rank, len(rngs) - 1)])

    # -- logs, progress, plots -----------------------------------------------------------------------------------

    def logger(self, step: int) -> RunLogger | _NullLogger:
        """``log.csv`` (+ TensorBoard) on the main process, holding only what this run has done: resumed at
        ``step``, the rows a killed run logged after its saved step are dropped (they are replayed); started afresh,
        an earlier attempt's rows are dropped."""
        if not self.dist.main:
            return _NullLogger()
        return RunLogger(self.path, resume_from=step if self.saved is not None else -1)

    def progress(self, total: int, initial: int = 0, unit: str = "steps", every: int | None = None) -> Progress:
        return Progress(total, f"{self.kind} {self.path.name}", unit=unit, initial=initial, every=every,
                        enabled=self.dist.main)

    def plot_learning_curves(self, title: str) -> None:
        """``learning_curves.png`` from ``log.csv`` (main process). A plot never fails a finished run."""
        if not self.dist.main:
            return
        from speechprompt.plots import plot_learning_curves

        try:
            plot_learning_curves(self.path / "log.csv", self.path / "learning_curves.png", title=title)
        except Exception as e:  # noqa: BLE001 (a missing figure must not lose a trained run)
            logger.warning("no learning-curve plot: %s", e)


def peak_memory(device: torch.device) -> dict[str, int | None]:
    """Peak resident set size of this process and, on CUDA, the peak allocated by torch (bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    cuda = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"peak_rss_bytes": int(rss), "peak_cuda_allocated_bytes": cuda}

