"""The config keys every trainer has, with one meaning: where the run goes, how it resumes, where and how it runs.

Each trainer's config dataclass inherits :class:`RunOptions`, so ``resume``, ``precision``, ``grad_accum``,
``ema_decay`` ... are spelled and checked the same way in ``train``, ``superb`` and ``pretrain-ulm``, and stay
top-level keys (``speechprompt train ... precision=bf16``).
"""

from __future__ import annotations

import dataclasses
import re

from speechprompt.config import ConfigError, option
from speechprompt.training.precision import Precision
from speechprompt.training.state import ResumeMode

# Keys of RunOptions that a resumed run may change: none of them changes what an update computes.
RUN_KEYS_MAY_CHANGE = frozenset({"run_dir", "resume", "device", "threads", "log_every", "activation_checkpointing"})


@dataclasses.dataclass(kw_only=True)
class RunOptions:
    """Keys shared by every trainer (see :mod:`speechprompt.training`)."""

    run_dir: str = option("exp/run", help="where the run's files go (a moved run directory resumes where it is)")
    resume: ResumeMode = option(
        ResumeMode.AUTO, help="auto: continue from run_dir/train_state.pt if there is one; true: continue, and fail "
        "without one; false: start afresh, and fail if run_dir holds a run")
    seed: int = option(0, help="seed of initialisation, shuffling and dropout")
    device: str = option("auto", help="auto (CUDA if available), cpu, cuda, cuda:N; under torchrun each process "
                         "takes its LOCAL_RANK GPU")
    threads: int = option(0, help="CPU threads of torch ops (0: torch's default); 1 is often fastest on a small or "
                          "shared CPU")
    precision: Precision = option(
        Precision.FP32, help="fp32, or bf16/fp16 autocast with fp32 trained tensors and optimizer (fp16 adds loss "
        "scaling)")
    grad_accum: int = option(1, help="micro-batches of batch_size per update on each process; an update takes "
                             "batch_size x grad_accum x processes examples")
    ema_decay: float = option(
        0.0, help="evaluate and save an exponential moving average of the trained tensors, updated with this decay "
        "after every update (0: off; 0.98 averages over ~50 updates)")
    activation_checkpointing: bool = option(
        False, help="recompute each transformer layer's activations in the backward pass instead of keeping them "
        "(less memory, ~30% more compute; for large backbones)")
    log_every: int = option(10, help="log the train loss every N updates")

    def __post_init__(self) -> None:
        if self.grad_accum < 1 or self.log_every < 1 or self.threads < 0:
            raise ConfigError("grad_accum and log_every must be >= 1, threads >= 0")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device {self.device!r} is not one of auto, cpu, cuda, cuda:N")
