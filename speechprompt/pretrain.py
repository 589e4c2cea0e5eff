"""Pretrain a unit language model on unit files (one CPU, one GPU, or many processes under torchrun).

The data is fairseq's ``language_modeling`` task with ``sample_break_mode=none``: utterances end with ``</s>``, are
concatenated, and are cut into blocks of ``tokens_per_sample`` next-token targets (see speechprompt.lm_data).
The run directory receives the resolved ``config.yaml``, ``log.csv`` (and TensorBoard events when installed),
fairseq-format ``checkpoint_last.pt`` / ``checkpoint_best.pt`` with ``dict.txt``, ``train_state.pt`` (everything
needed to resume exactly) and, at the end, ``metrics.json``.

A run resumes automatically from ``train_state.pt``, and a run killed at any point and resumed ends with the same
weights as one never interrupted. Under ``torchrun --nproc_per_node N`` each process takes ``batch_size`` blocks of
every step, so N processes train like one process with ``N * batch_size``.

Example:
  speechprompt pretrain-ulm --config recipes/pretrain_ulm/conf/small.yaml train=a.units dev=b.units
  torchrun --nproc_per_node 2 -m speechprompt.cli pretrain-ulm --config C.yaml run_dir=exp/ulm_ddp
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from speechprompt.config import ConfigError, describe, load_config, option, save_config, to_dict
from speechprompt.devices import torch_threads
from speechprompt.dictionary import Dictionary
from speechprompt.errors import CheckpointError, SpeechPromptError
from speechprompt.fileio import torch_save, write_json
from speechprompt.lm_data import PackedLMDataset, StepBatches
from speechprompt.models.unit_lm import NAMED_CONFIGS, UnitLM, UnitLMConfig, save_unit_lm
from speechprompt.rng import rng_state, set_rng_state
from speechprompt.runlog import RunLogger
from speechprompt.schedule import SCHEDULES, lr_at

logger = logging.getLogger(__name__)

STATE_NAME = "train_state.pt"
STATE_FORMAT = 1

# Config keys that may change when a run is resumed: they do not change what the next update computes.
_RESUMABLE_CHANGES = {"max_steps", "eval_every", "save_every", "log_every", "num_workers", "device", "threads",
                      "run_dir", "resume"}


@dataclass
class PretrainConfig:
    """Everything ``speechprompt pretrain-ulm`` reads; see ``--help`` for each key."""

    train: str | list[str] = option([], help="training unit file(s): one utterance per line, space-separated ints")
    dev: str = option("", help="dev unit file, for perplexity and checkpoint_best.pt")
    n_units: int = option(100, help="number of units K (unit u is token u+4 in dict.txt)")
    model: str = option("small", help=f"named unit LM architecture: {', '.join(NAMED_CONFIGS)}")
    model_overrides: dict[str, Any] = option(
        {}, help="UnitLMConfig fields that override the named architecture, e.g. model_overrides.layers=4"
    )
    dropout: float | None = option(None, help="dropout of the model (null keeps the architecture's)")
    tokens_per_sample: int = option(256, help="targets per packed block (fairseq tokens_per_sample)")
    batch_size: int = option(16, help="blocks per step and process (under torchrun the step takes N times this)")
    max_steps: int = option(2000, help="number of updates to train for")
    lr: float = option(1e-3, help="peak learning rate")
    warmup_steps: int = option(200, help="updates of linear warmup from 0 to lr")
    schedule: str = option("inverse_sqrt", help=f"LR schedule after warmup: {', '.join(SCHEDULES)}")
    lr_decay_steps: int = option(
        0, help="updates over which cosine decays to min_lr_ratio*lr (0: max_steps); fix it to extend a run"
    )
    min_lr_ratio: float = option(0.0, help="cosine floor, as a fraction of lr")
    betas: tuple[float, float] = option((0.9, 0.98), help="Adam betas")
    adam_eps: float = option(1e-8, help="Adam epsilon")
    weight_decay: float = option(0.01, help="decoupled (AdamW) weight decay, applied to every parameter as fairseq")
    clip_norm: float = option(1.0, help="clip the gradient norm to this (0 disables)")
    log_every: int = option(10, help="log the train loss every this many updates")
    eval_every: int = option(200, help="evaluate dev perplexity every this many updates (and at the end)")
    save_every: int = option(200, help="save checkpoint_last.pt and the training state every this many updates")
    seed: int = option(1, help="seeds model init, dropout and the block order")
    run_dir: str = option("exp/pretrain_ulm", help="output directory")
    resume: bool = option(True, help="resume from run_dir/train_state.pt if present; false refuses a non-empty run_dir")
    num_workers: int = option(0, help="DataLoader worker processes building batches")
    device: Literal["auto", "cpu", "cuda"] = option("auto", help="auto picks cuda when available")
    threads: int = option(
        0, help="CPU threads of torch ops (0: torch's default; torchrun sets 1 per process); fewer threads than "
        "cores often run faster on a shared machine"
    )

    def __post_init__(self) -> None:
        if isinstance(self.train, str):
            self.train = [self.train]
        self.betas = tuple(self.betas)
        if not self.train:
            raise ConfigError("train: give one or more unit files (train=FILE or train=[A,B])")
        if not self.dev:
            raise ConfigError("dev: give a dev unit file (dev=FILE)")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        for name in ("n_units", "tokens_per_sample", "batch_size", "max_steps", "log_every", "eval_every",
                     "save_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "lr_decay_steps", "num_workers", "threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas) or len(self.betas) != 2:
            raise ConfigError(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.clip_norm < 0 or self.weight_decay < 0:
            raise ConfigError("clip_norm and weight_decay must be >= 0")
        self.model_config()  # fail now, not after the data is read

    def model_config(self) -> UnitLMConfig:
        """The architecture: the named config, ``model_overrides``, ``dropout``, and a vocabulary of K + 4."""
        overrides = dict(self.model_overrides)
        vocab = self.n_units + 4
        if overrides.setdefault("vocab_size", vocab) != vocab:
            raise ConfigError(f"model_overrides.vocab_size {overrides['vocab_size']} != n_units + 4 = {vocab}")
        if self.dropout is not None:
            overrides["dropout"] = self.dropout
        cfg = UnitLMConfig.named(self.model, **overrides)
        if cfg.max_positions < self.tokens_per_sample:
            raise ConfigError(
                f"tokens_per_sample {self.tokens_per_sample} exceeds the model's max_positions {cfg.max_positions}"
            )
        return cfg


# --------------------------------------------------------------------------------------------------------------
# Processes and devices


@dataclass
class Dist:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_reduce(self, t: Tensor) -> Tensor:
        if self.active:
            dist.all_reduce(t)
        return t


def _select_device(name: str, local_rank: int) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but CUDA is not available (use device=auto or cpu)")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def distributed(device_name: str) -> Iterator[tuple[Dist, torch.device]]:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE`` > 1), or run alone.

    gloo on CPU, nccl on CUDA (one GPU per process, by ``LOCAL_RANK``). The group is destroyed on exit.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        yield Dist(), _select_device(device_name, 0)
        return
    info = Dist(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    device = _select_device(device_name, info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield info, device
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------------
# Training state: everything the next update depends on


def load_training_state(path: Path) -> dict[str, Any]:
    """Read ``train_state.pt`` with ``weights_only=True``: it holds only tensors and plain values."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file is the same user-facing problem
        raise CheckpointError(f"{path}: unreadable training state ({e}); move it away to start over") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a speechprompt pretrain-ulm training state (format {STATE_FORMAT})")
    return state


def _check_resumable(cfg: PretrainConfig, saved: dict[str, Any], path: Path) -> None:
    now = to_dict(cfg)
    for key, value in saved.items():
        if key not in _RESUMABLE_CHANGES and now.get(key) != value:
            raise ConfigError(
                f"{path} was written with {key}={value!r}, not {now.get(key)!r}; a resumed run must keep it "
                "(use another run_dir, or resume=false on an empty one)"
            )


# --------------------------------------------------------------------------------------------------------------
# Loss and evaluation


def token_nll(model: nn.Module, source: Tensor, target: Tensor, pad: int) -> tuple[Tensor, Tensor]:
    """Summed next-token NLL (nats) over the non-pad targets, and their count.

    Args:
        source: ``(B, T)`` inputs; target: ``(B, T)`` next tokens, ``pad`` where there is none.
    """
    logits = model(source)  # (B, T, V)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=pad, reduction="sum")
    return nll, target.ne(pad).sum()


@torch.no_grad()
def evaluate(model: nn.Module, data: PackedLMDataset, batch_size: int, device: torch.device, d: Dist) -> float:
    """Mean next-token NLL (nats) over every target of ``data``; the blocks are shared between processes."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    mine = list(range(d.rank, len(data), d.world_size))
    for i in range(0, len(mine), batch_size):
        source, target = data.collate([data[j] for j in mine[i : i + batch_size]])
        nll, count = token_nll(model, source.to(device), target.to(device), data.pad)
        totals += torch.stack([nll.double(), count.double()])
    d.all_reduce(totals)
    model.train(was_training)
    return float(totals[0] / totals[1])


def unigram_nll(train: PackedLMDataset, dev: PackedLMDataset, dictionary: Dictionary) -> float:
    """Dev NLL (nats per token) of an add-one unigram model of the training targets: the baseline to beat."""
    counts = train.token_counts(len(dictionary)).double()
    support = torch.zeros(len(dictionary), dtype=torch.bool)
    support[dictionary.nspecial :] = True
    support[dictionary.eos_index] = True
    probs = torch.where(support, counts + 1.0, torch.zeros_like(counts))
    logp = torch.log(probs / probs.sum())
    dev_counts = dev.token_counts(len(dictionary)).double()
    return float(-(dev_counts[support] * logp[support]).sum() / dev_counts.sum())


def _ppl(nll: float) -> dict[str, float]:
    """fairseq prints the loss in bits (base 2) and ``ppl = 2 ** loss``, which equals ``exp`` of the loss in nats."""
    return {"loss": nll, "loss_bits": nll / math.log(2), "ppl": math.exp(min(nll, 700.0))}


# --------------------------------------------------------------------------------------------------------------
# The run


class _Run:
    """One pretraining run: the model, optimizer and data of :func:`pretrain`, and what a resume restores."""

    def __init__(self, cfg: PretrainConfig, d: Dist, device: torch.device) -> None:
        self.cfg, self.d, self.device = cfg, d, device
        self.run_dir = Path(cfg.run_dir)
        self.dictionary = Dictionary.for_units(cfg.n_units)
        self.pad = self.dictionary.pad_index
        self.train_data = PackedLMDataset.from_unit_files(cfg.train, self.dictionary, cfg.tokens_per_sample)
        self.dev_data = PackedLMDataset.from_unit_files([cfg.dev], self.dictionary, cfg.tokens_per_sample)
        self.unigram_nll = unigram_nll(self.train_data, self.dev_data, self.dictionary)

        torch.manual_seed(cfg.seed)  # the same initial weights on every process
        self.model = UnitLM(cfg.model_config()).to(device)
        # Dropout must differ between processes; from here on every RNG is part of the saved state.
        random.seed(cfg.seed + d.rank)
        np.random.seed(cfg.seed + d.rank)
        torch.manual_seed(cfg.seed + d.rank)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay
        )
        # DDP averages gradients over processes; a single process trains the model itself.
        self.trained: nn.Module = self.model
        if d.active:
            self.trained = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.step = 0
        self.best_dev_loss = math.inf
        self.best_step = -1
        self.elapsed = 0.0  # training seconds of earlier sessions

    # ---- state ---------------------------------------------------------------------------------------------

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a saved training state (model, optimizer, step, best dev loss, RNG states)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.best_dev_loss = float(state["best_dev_loss"])
        self.best_step = int(state["best_step"])
        self.elapsed = float(state["elapsed"])
        rngs = state["rng"]
        if len(rngs) == self.d.world_size:
            set_rng_state(rngs[self.d.rank])
        else:
            logger.warning("resuming %d processes from a run of %d: dropout will not replay exactly",
                           self.d.world_size, len(rngs))
            set_rng_state(rngs[0])
            torch.manual_seed(self.cfg.seed + self.d.rank + 7919 * self.step)

    def save(self, elapsed: float) -> None:
        """checkpoint_last.pt (fairseq format), then the training state, whose atomic rename commits the step."""
        mine = rng_state()
        rngs = [mine]
        if self.d.active:
            rngs = [None] * self.d.world_size
            dist.all_gather_object(rngs, mine)
        if not self.d.main:
            return
        save_unit_lm(self.model, self.dictionary, self.run_dir / "checkpoint_last.pt", extra={"step": self.step})
        torch_save(
            {
                "format": STATE_FORMAT,
                "step": self.step,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "rng": rngs,
                "best_dev_loss": self.best_dev_loss,
                "best_step": self.best_step,
                "elapsed": elapsed,
                # Batches are a function of the step (lm_data.StepBatches): this is the data-order position.
                "blocks_consumed": self.step * self.cfg.batch_size * self.d.world_size,
                "config": to_dict(self.cfg),
            },
            self.run_dir / STATE_NAME,
        )

    # ---- training ------------------------------------------------------------------------------------------

    def lr(self, step: int) -> float:
        cfg = self.cfg
        return lr_at(cfg.schedule, step, cfg.lr, cfg.warmup_steps, cfg.lr_decay_steps or cfg.max_steps,
                     cfg.min_lr_ratio)

    def batches(self) -> torch.utils.data.DataLoader:
        """This process's ``(source, target)`` batches ``(B, T)`` for steps ``self.step .. max_steps - 1``."""
        batches = StepBatches(self.train_data, self.cfg.batch_size, self.cfg.seed, self.d.rank, self.d.world_size)
        return torch.utils.data.DataLoader(
            batches,
            batch_size=None,
            sampler=range(self.step, self.cfg.max_steps),
            num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            # Its own generator: an iterator would otherwise draw a seed from the global RNG, which a resumed
            # run would draw at a different step than an uninterrupted one.
            generator=torch.Generator(),
        )

    def train_step(self, source: Tensor, target: Tensor) -> tuple[Tensor, float, float]:
        """One update on ``(B, T)`` sources and targets.

        Returns:
            ``(2,)`` float64 summed NLL and target count of the whole step (all processes), the learning rate, and
            the gradient norm before clipping.
        """
        lr = self.lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        nll, count = token_nll(self.trained, source.to(self.device), target.to(self.device), self.pad)
        # Normalise by the targets of the whole step over all processes: since DDP averages gradients over
        # processes, N processes then take exactly the step of one process with N times the batch.
        totals = self.d.all_reduce(torch.stack([nll.detach().double(), count.double()]))
        if not math.isfinite(float(totals[0])):
            raise SpeechPromptError(f"non-finite training loss at step {self.step + 1}; lower lr or raise warmup")
        (nll * (self.d.world_size / totals[1].item())).backward()
        grad_norm = nn.utils.clip_grad_norm_(self.params, self.cfg.clip_norm or math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return totals.cpu(), lr, float(grad_norm)

    def evaluate(self) -> tuple[dict[str, float], bool]:
        """Dev loss/ppl, and whether it is the best so far (which then becomes the best)."""
        dev = _ppl(evaluate(self.model, self.dev_data, self.cfg.batch_size, self.device, self.d))
        improved = dev["loss"] < self.best_dev_loss
        if improved:
            self.best_dev_loss, self.best_step = dev["loss"], self.step
        return dev, improved


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Run (or resume) pretraining as ``cfg`` says. Returns the final metrics (also in ``run_dir/metrics.json``)."""
    with distributed(cfg.device) as (d, device), torch_threads(cfg.threads):
        state = _check_run_dir(cfg)
        d.barrier()  # every process has looked at run_dir before the main one writes to it
        run = _Run(cfg, d, device)
        if state is not None:
            run.restore(state)
        log = None
        if d.main:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run.run_dir / "config.yaml")
            log = RunLogger(run.run_dir, resume_from=run.step if state is not None else 0)
        try:
            metrics = _train(run, log)
        finally:
            if log is not None:
                log.close()
        if d.main:
            write_json(run.run_dir / "metrics.json", metrics)
        d.barrier()
        return metrics


def _check_run_dir(cfg: PretrainConfig) -> dict[str, Any] | None:
    """The training state to resume from, or ``None`` to start; refuses a used run_dir when ``resume=false``."""
    run_dir = Path(cfg.run_dir)
    state_path = run_dir / STATE_NAME
    if cfg.resume and state_path.is_file():
        state = load_training_state(state_path)
        _check_resumable(cfg, state["config"], state_path)
        return state
    if not cfg.resume and run_dir.is_dir() and any(run_dir.iterdir()):
        raise ConfigError(f"run_dir {run_dir} is not empty and resume=false: choose a new run_dir or resume=true")
    return None


def _train(run: _Run, log: RunLogger | None) -> dict[str, Any]:
    """The loop: steps, logging (main process only), evaluation, checkpoints. Returns the final metrics."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    cfg, d = run.cfg, run.d
    n_params = sum(p.numel() for p in run.params)
    if log is not None:
        logger.info(
            "%s on %s: %d parameters; train %d utterances, %d tokens, %d blocks of %d; dev %d tokens; unigram dev "
            "ppl %.2f", f"resuming at step {run.step}" if run.step else "starting",
            f"{d.world_size} processes" if d.active else run.device, n_params, run.train_data.num_utterances,
            run.train_data.num_targets, len(run.train_data), cfg.tokens_per_sample, run.dev_data.num_targets,
            math.exp(run.unigram_nll),
        )
        if not run.step:
            log.log(0, unigram_dev_loss=run.unigram_nll, unigram_dev_ppl=math.exp(run.unigram_nll))

    session_start = time.monotonic()
    window = torch.zeros(2, dtype=torch.float64)  # summed train NLL and targets since the last log line
    window_start, session_tokens = session_start, 0.0
    train_loss, dev = math.nan, None
    bar = tqdm(total=cfg.max_steps, initial=run.step, disable=log is None, unit="step", dynamic_ncols=True,
               desc="pretrain-ulm")
    run.trained.train()
    with logging_redirect_tqdm(), bar:
        for source, target in run.batches():
            totals, lr, grad_norm = run.train_step(source, target)
            window += totals
            session_tokens += float(totals[1])
            bar.update(1)
            step, last = run.step, run.step == cfg.max_steps
            if log is not None and (step % cfg.log_every == 0 or last):
                train_loss = float(window[0] / window[1])
                now = time.monotonic()
                log.log(step, train_loss=train_loss, lr=lr, grad_norm=grad_norm,
                        tokens_per_s=float(window[1]) / max(now - window_start, 1e-9),
                        epoch=step * cfg.batch_size * d.world_size / len(run.train_data))
                bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}")
                window.zero_()
                window_start = now
            if step % cfg.eval_every == 0 or last:
                dev, improved = run.evaluate()
                if log is not None:
                    log.log(step, dev_loss=dev["loss"], dev_loss_bits=dev["loss_bits"], dev_ppl=dev["ppl"])
                    logger.info("step %d: dev loss %.4f nats (%.4f bits), ppl %.3f%s", step, dev["loss"],
                                dev["loss_bits"], dev["ppl"], " (best)" if improved else "")
                    if improved:
                        save_unit_lm(run.model, run.dictionary, run.run_dir / "checkpoint_best.pt",
                                     extra={"step": step, "dev_ppl": dev["ppl"]})
            if step % cfg.save_every == 0 or last:
                run.save(run.elapsed + time.monotonic() - session_start)

    if dev is None:  # a finished run resumed: nothing trained, report what is there
        dev, _ = run.evaluate()
    session = time.monotonic() - session_start
    return {
        "step": run.step,
        "train_loss": None if math.isnan(train_loss) else train_loss,  # None: resumed a finished run
        "dev_loss": dev["loss"],
        "dev_loss_bits": dev["loss_bits"],
        "dev_ppl": dev["ppl"],
        "best_dev_ppl": math.exp(run.best_dev_loss),
        "best_step": run.best_step,
        "unigram_dev_ppl": math.exp(run.unigram_nll),
        "num_params": n_params,
        "train_tokens": run.train_data.num_targets,
        "dev_tokens": run.dev_data.num_targets,
        "world_size": d.world_size,
        "wall_time_s": run.elapsed + session,
        "train_tokens_per_s": session_tokens / max(session, 1e-9),  # this session's speed
    }


# --------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (keys below); key=value overrides are applied after it")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. max_steps=500")
    parser.epilog = "config keys:\n" + describe(PretrainConfig)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    metrics = pretrain(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics), file=sys.stdout, flush=True)
    return 0
