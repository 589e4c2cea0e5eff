"""The optimizer side of every trainer: its config, and one update from any number of micro-batches and processes.

A trainer's loop stays a loop; :class:`Updater` is the part every loop shares::

    updater = Updater(params, cfg.optim, precision, dist, ema_decay=cfg.ema_decay)
    for micro_batch in step_batches:                 # gradient accumulation: 1 or more per update
        with precision.autocast():
            loss_sum, terms = task.loss(micro_batch)  # summed loss and its number of terms (targets)
        updater.backward(loss_sum, terms)
    stats = updater.step(lr)                          # all-reduce, normalise, clip, step, moving average

The update is normalised by the loss terms of the whole step (every micro-batch, every process), so accumulating k
micro-batches on N processes takes exactly the update of one batch k*N times larger.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from speechprompt.config import ConfigError, option
from speechprompt.errors import SpeechPromptError
from speechprompt.training.distributed import Dist, all_reduce_gradients
from speechprompt.training.ema import EMA
from speechprompt.training.precision import MixedPrecision
from speechprompt.training.schedule import SCHEDULES, lr_at


class TrainingError(SpeechPromptError):
    """Training cannot go on (a non-finite loss); what was saved before stays as it was."""


@dataclasses.dataclass
class OptimConfig:
    """Adam and the learning-rate schedule (SpeechPrompt: Adam(0.9, 0.98), lr 5e-3 for prompts, clip 1.0)."""

    lr: float = option(5e-3, help="peak learning rate")
    betas: list[float] = option([0.9, 0.98], help="Adam betas")
    eps: float = option(1e-8, help="Adam epsilon")
    weight_decay: float = option(0.0, help="decoupled weight decay (AdamW) when > 0")
    clip: float = option(1.0, help="clip the gradient norm to this (0: no clipping)")
    schedule: str = option("constant", help=f"after warmup: {' | '.join(SCHEDULES)}")
    warmup_steps: int = option(0, help="linear warmup updates")
    min_lr_ratio: float = option(0.0, help="cosine, tri_stage: the floor, as a fraction of lr (tri_stage: fairseq's "
                                 "final_lr_scale)")
    decay_steps: int = option(0, help="cosine, tri_stage: updates the schedule spans (0: the run's max updates); fix "
                              "it to extend a run later")

    def __post_init__(self) -> None:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.lr <= 0 or self.clip < 0 or self.warmup_steps < 0 or self.weight_decay < 0 or self.decay_steps < 0:
            raise ConfigError("optim.lr must be positive; clip, warmup_steps, weight_decay and decay_steps "
                              "non-negative")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")

    def lr_at(self, step: int, total_steps: int) -> float:
        """The rate of the update taken after ``step`` updates, in a run of ``total_steps``."""
        return lr_at(self.schedule, step, self.lr, self.warmup_steps, self.decay_steps or total_steps,
                     self.min_lr_ratio)


def check_schedule_unchanged(optim: OptimConfig, saved_total: int, total: int, steps_done: int, path: object) -> None:
    """Refuse a resumed run whose new length would change the rate of updates it already took (a schedule that
    decays over the run's length, without a fixed ``decay_steps``).

    Raises:
        ConfigError: naming both lengths and the fix.
    """
    if saved_total == total:
        return
    if any(optim.lr_at(s, saved_total) != optim.lr_at(s, total) for s in range(steps_done)):
        raise ConfigError(f"{path}: a run of {total} updates instead of {saved_total} changes the learning rate of "
                          f"updates already taken (optim.schedule={optim.schedule} decays over the run's length); "
                          "keep the length, or use another run_dir (set optim.decay_steps to make a run extendable)")


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam, or AdamW when ``weight_decay > 0`` (the same update when it is 0), with the fused kernel where torch has
    one: on a CPU the default (foreach) step of a 151M-parameter LM took 1.2-1.9 s with model-sized temporaries, the
    fused one 0.15 s with none (docs/benchmarks.md)."""
    params = list(params)
    cls = torch.optim.AdamW if cfg.weight_decay > 0 else torch.optim.Adam
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
               fused=_fused_supported(params) or None)


def _fused_supported(params: list[nn.Parameter]) -> bool:
    """Whether torch's fused Adam runs on these parameters: floating point, on CUDA, or on a CPU from torch 2.4."""
    if not params or not all(p.is_floating_point() for p in params):
        return False
    devices = {p.device.type for p in params}
    cpu_ok = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 4)
    return devices == {"cuda"} or (devices == {"cpu"} and cpu_ok)


@dataclasses.dataclass
class UpdateStats:
    """What one update did."""

    loss: float  # mean loss over the step's terms, all processes
    terms: int  # loss terms (targets) of the step, all processes
    grad_norm: float  # before clipping
    skipped: bool  # no update was taken (fp16 overflow, or no loss term at all)


class Updater:
    """Accumulates micro-batch gradients and takes the update (see the module docstring).

    Args:
        params: the trained tensors (a tensor listed twice counts once).
        optim: optimizer and clipping settings.
        precision: autocast/loss scaling (its scaler is used in fp16).
        dist: the process group (gradients are summed over it).
        ema_decay: keep a moving average of ``params`` with this decay (0: none); see :class:`EMA`.
    """

    def __init__(self, params: Iterable[nn.Parameter], optim: OptimConfig, precision: MixedPrecision, dist: Dist,
                 ema_decay: float = 0.0) -> None:
        self.params = list({id(p): p for p in params}.values())
        self.cfg, self.precision, self.dist = optim, precision, dist
        self.optimizer = build_optimizer(self.params, optim)
        self.ema = EMA(self.params, ema_decay) if ema_decay else None
        self._loss: Tensor | float = 0.0
        self._terms = 0

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.params)

    def backward(self, loss_sum: Tensor, terms: int) -> None:
        """Backward of one micro-batch's *summed* loss over its ``terms`` loss terms."""
        if terms:
            self.precision.scale(loss_sum).backward()
        self._loss = self._loss + loss_sum.detach().double()
        self._terms += int(terms)

    def step(self, lr: float) -> UpdateStats:
        """Sum over processes, normalise by the step's terms, clip, take the update, average; reset.

        Raises:
            TrainingError: the step's loss is not finite (on every process alike).
        """
        device = self.params[0].device
        totals = torch.tensor([float(self._loss), float(self._terms)], dtype=torch.float64, device=device)
        self.dist.all_reduce(totals)
        self._loss, self._terms = 0.0, 0
        loss_sum, terms = float(totals[0]), int(totals[1])
        if not math.isfinite(loss_sum):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(f"non-finite training loss ({loss_sum}); lower the learning rate, raise warmup, or "
                                "use fp32 (the last saved state and checkpoints are kept)")
        if terms == 0:  # nothing in this update had a loss (every file of it unreadable): no step at all
            self.optimizer.zero_grad(set_to_none=True)
            return UpdateStats(math.nan, 0, 0.0, True)
        all_reduce_gradients(self.params, self.dist)
        scaler = self.precision.scaler
        if scaler.is_enabled():
            scaler.unscale_(self.optimizer)
        for p in self.params:
            if p.grad is not None:
                p.grad.div_(max(terms, 1))
        grad_norm = float(nn.utils.clip_grad_norm_(self.params, self.cfg.clip or math.inf))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        scale_before = scaler.get_scale() if scaler.is_enabled() else None
        scaler.step(self.optimizer)
        scaler.update()
        skipped = scale_before is not None and scaler.get_scale() < scale_before
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None and not skipped:
            self.ema.update()
        return UpdateStats(loss_sum / max(terms, 1), terms, grad_norm, skipped)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.precision.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.precision.load_state_dict(state.get("scaler") or {})
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
