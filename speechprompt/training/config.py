"""The config keys every trainer has, with one meaning: where the run goes, how it resumes, where and how it runs.

Each trainer's config dataclass inherits :class:`RunOptions`, so ``resume``, ``precision``, ``grad_accum``,
``ema_decay`` ... are spelled and checked the same way in ``train``, ``superb`` and ``pretrain-ulm``, and stay
top-level keys (``speechprompt train ... precision=bf16``). The two pretraining trainers (``pretrain-ulm``,
``pretrain-hubert``) inherit :class:`PretrainOptions` too: the length of the run, the optimizer and its schedule,
how often to evaluate and save.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

from speechprompt.config import ConfigError, option
from speechprompt.training.optim import OptimConfig
from speechprompt.training.precision import Precision
from speechprompt.training.schedule import SCHEDULES
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


# --------------------------------------------------------------------------------------------------------------
# The pretraining trainers


# Keys of PretrainOptions that a resumed run may change, with RUN_KEYS_MAY_CHANGE: a longer run is resumed by raising
# max_steps (check_schedule_unchanged says when that changes the schedule), and the intervals and loader workers do
# not change what an update computes.
PRETRAIN_KEYS_MAY_CHANGE = RUN_KEYS_MAY_CHANGE | {"max_steps", "eval_every", "save_every", "num_workers"}


@dataclasses.dataclass(kw_only=True)
class _PretrainKeys:
    """The keys :class:`PretrainOptions` gives a trainer config, in their order, with the help text and the default
    a trainer keeps unless it names its own."""

    max_steps: int = option(2000, help="number of updates to train for")
    lr: float = option(1e-3, help="peak learning rate")
    warmup_steps: int = option(200, help="updates of linear warmup from 0 to lr")
    schedule: str = option("inverse_sqrt", help=f"LR schedule after warmup: {', '.join(SCHEDULES)}")
    lr_decay_steps: int = option(0, help="updates over which the rate decays (0: max_steps); fix it to extend a run")
    min_lr_ratio: float = option(0.0, help="where the decay ends, as a fraction of lr")
    betas: tuple[float, float] = option((0.9, 0.98), help="Adam betas")
    adam_eps: float = option(1e-8, help="Adam epsilon")
    weight_decay: float = option(0.01, help="decoupled (AdamW) weight decay, applied to every parameter as fairseq")
    clip_norm: float = option(1.0, help="clip the gradient norm to this (0 disables)")
    eval_every: int = option(200, help="evaluate the dev loss every this many updates (and at the end)")
    save_every: int = option(200, help="save checkpoint_last.pt and the training state every this many updates")
    num_workers: int = option(0, help="DataLoader worker processes building batches")


@dataclasses.dataclass(kw_only=True)
class PretrainOptions(RunOptions):
    """Keys shared by the pretraining trainers: ``max_steps``, the optimizer and its schedule (``lr``,
    ``warmup_steps``, ``schedule``, ``lr_decay_steps``, ``min_lr_ratio``, ``betas``, ``adam_eps``, ``weight_decay``,
    ``clip_norm``), ``eval_every``, ``save_every`` and ``num_workers``; checked here, once.

    A trainer's config inherits them and names its own defaults as class keywords: a value, or a whole
    :func:`~speechprompt.config.option` where its help text says more for that trainer. The keys follow the
    trainer's own keys in ``--help`` and ``config.yaml`` (a trainer lists what it trains on first)::

        @dataclasses.dataclass(kw_only=True)
        class PretrainHubertConfig(PretrainOptions, max_steps=400000, lr=5e-4, schedule="polynomial_decay"):
            train: str = option("", help="training manifest")
            ...
    """

    # No fields of its own: a field declared here would be listed before the trainer's keys. Each subclass receives
    # the keys of _PretrainKeys as its own (__init_subclass__).

    def __init_subclass__(cls, **defaults: Any) -> None:
        """Give a trainer config the keys of :class:`_PretrainKeys` after its own, with its ``defaults``.

        Declaring them here, before ``@dataclass`` reads the class, is what puts them after the trainer's own keys:
        inherited fields would come first.
        """
        super().__init_subclass__()
        if PretrainOptions not in cls.__bases__:  # a subclass of a trainer config keeps the keys it inherits
            if defaults:
                raise TypeError(f"{cls.__name__}: pretraining defaults are set where PretrainOptions is inherited")
            return
        own = dict(inspect.get_annotations(cls))  # the class's own keys, in their order
        for key in dataclasses.fields(_PretrainKeys):
            if key.name in own:
                raise TypeError(f"{cls.__name__} declares {key.name}: give its default as a class keyword instead")
            value = defaults.pop(key.name, key.default)
            own[key.name] = inspect.get_annotations(_PretrainKeys)[key.name]
            setattr(cls, key.name, value if isinstance(value, dataclasses.Field)
                    else option(value, help=key.metadata["help"]))
        if defaults:
            raise TypeError(f"{cls.__name__}: {', '.join(sorted(defaults))} are not keys of PretrainOptions")
        cls.__annotations__ = own

    def __post_init__(self) -> None:
        super().__post_init__()
        self.betas = tuple(self.betas)
        for name in ("max_steps", "eval_every", "save_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "lr_decay_steps", "num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        self.optim()  # lr, betas, schedule, ... checked as every trainer checks them

    def optim(self) -> OptimConfig:
        """The optimizer settings in the form every trainer shares."""
        return OptimConfig(lr=self.lr, betas=list(self.betas), eps=self.adam_eps, weight_decay=self.weight_decay,
                           clip=self.clip_norm, schedule=self.schedule, warmup_steps=self.warmup_steps,
                           min_lr_ratio=self.min_lr_ratio, decay_steps=self.lr_decay_steps)
