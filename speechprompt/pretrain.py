"""Pretrain a unit language model on unit files (one CPU, one GPU, or many processes under torchrun).

The data is fairseq's ``language_modeling`` task with ``sample_break_mode=none``: utterances end with ``</s>``, are
concatenated, and are cut into blocks of ``tokens_per_sample`` next-token targets (see speechprompt.lm_data).
The run directory receives the resolved ``config.yaml``, ``log.csv`` (and TensorBoard events when installed),
fairseq-format ``checkpoint_last.pt`` / ``checkpoint_best.pt`` with ``dict.txt``, ``train_state.pt`` (everything
needed to resume exactly), ``learning_curves.png`` and, at the end, ``metrics.json``.

A run resumes automatically from ``train_state.pt`` (resume=auto), and a run killed at any point and resumed ends
with the same weights as one never interrupted. Under ``torchrun --nproc_per_node N`` each process takes
``batch_size x grad_accum`` blocks of every step, so N processes train like one process with N times the batch.
With ``ema_decay``, dev perplexity and both checkpoints are those of the moving average of the weights.

Example:
  speechprompt pretrain-ulm --config recipes/pretrain_ulm/conf/small.yaml train=a.units dev=b.units
  torchrun --nproc_per_node 2 -m speechprompt.cli pretrain-ulm --config C.yaml run_dir=exp/ulm_ddp
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechprompt.config import ConfigError, option
from speechprompt.devices import torch_threads
from speechprompt.dictionary import Dictionary
from speechprompt.lm_data import PackedLMDataset, StepBatches
from speechprompt.models.transformer import set_activation_checkpointing
from speechprompt.models.unit_lm import NAMED_CONFIGS, UnitLM, UnitLMConfig, save_unit_lm
from speechprompt.rng import seed_everything
from speechprompt.training.config import PRETRAIN_KEYS_MAY_CHANGE, PretrainOptions
from speechprompt.training.distributed import Dist, distributed
from speechprompt.training.ema import maybe_averaged
from speechprompt.training.optim import Updater
from speechprompt.training.precision import MixedPrecision
from speechprompt.training.pretraining import Clock, add_config_arguments, finish, resume, run_command, step_loader
from speechprompt.training.run import RunDir

logger = logging.getLogger(__name__)

KIND = "pretrain-ulm"
STATE_VERSION = 2

# Config keys that may change when a run is resumed: they do not change what the next update computes.
MAY_CHANGE = PRETRAIN_KEYS_MAY_CHANGE


@dataclasses.dataclass(kw_only=True)
class PretrainConfig(
    PretrainOptions,
    lr_decay_steps=option(
        0, help="updates over which cosine decays to min_lr_ratio*lr (0: max_steps); fix it to extend a run"),
    min_lr_ratio=option(0.0, help="cosine floor, as a fraction of lr"),
    eval_every=option(200, help="evaluate dev perplexity every this many updates (and at the end)"),
):
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
    batch_size: int = option(16, help="blocks per micro-batch and process (an update takes batch_size x "
                             "grad_accum x processes blocks)")
    seed: int = option(1, help="seeds model init, dropout and the block order")
    run_dir: str = option("exp/pretrain_ulm", help="output directory (a moved run directory resumes where it is)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.train, str):
            self.train = [self.train]
        if not self.train:
            raise ConfigError("train: give one or more unit files (train=FILE or train=[A,B])")
        if not self.dev:
            raise ConfigError("dev: give a dev unit file (dev=FILE)")
        for name in ("n_units", "tokens_per_sample", "batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
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
# Loss and evaluation


def token_nll(model: nn.Module, source: Tensor, target: Tensor, pad: int) -> tuple[Tensor, int]:
    """Summed next-token NLL (nats) over the non-pad targets, and their count.

    Args:
        source: ``(B, T)`` inputs; target: ``(B, T)`` next tokens, ``pad`` where there is none.
    """
    logits = model(source)  # (B, T, V)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=pad, reduction="sum")
    return nll, int(target.ne(pad).sum())


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
        totals += torch.tensor([float(nll), float(count)], dtype=torch.float64, device=device)
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


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Run (or resume) pretraining as ``cfg`` says. Returns the final metrics (also in ``run_dir/metrics.json``)."""
    with torch_threads(cfg.threads), distributed(cfg.device) as (d, device), \
            RunDir(cfg.run_dir, KIND, cfg, STATE_VERSION, MAY_CHANGE, cfg.resume, d) as run:
        return _pretrain(cfg, run, d, device)


def _pretrain(cfg: PretrainConfig, run: RunDir, d: Dist, device: torch.device) -> dict[str, Any]:
    dictionary = Dictionary.for_units(cfg.n_units)
    pad = dictionary.pad_index
    train_data = PackedLMDataset.from_unit_files(cfg.train, dictionary, cfg.tokens_per_sample)
    dev_data = PackedLMDataset.from_unit_files([cfg.dev], dictionary, cfg.tokens_per_sample)
    unigram = unigram_nll(train_data, dev_data, dictionary)

    seed_everything(cfg.seed)  # the same initial weights on every process
    model = UnitLM(cfg.model_config()).to(device)
    if cfg.activation_checkpointing:
        set_activation_checkpointing(model)
    seed_everything(cfg.seed + d.rank)  # dropout differs between processes; every RNG is part of the saved state
    optim = cfg.optim()
    updater = Updater(model.parameters(), optim, MixedPrecision(cfg.precision, device), d, cfg.ema_decay)
    pos = resume(run, cfg, model, updater)

    def save(metrics: dict[str, Any] | None = None) -> None:
        """checkpoint_last.pt (fairseq format), then the training state, whose atomic rename commits the step."""
        clock.lap()
        if d.main:
            with maybe_averaged(updater.ema):
                save_unit_lm(model, dictionary, run.path / "checkpoint_last.pt", extra={"step": pos.step})
        run.save_state(position=dataclasses.asdict(pos), model=model.state_dict(), updater=updater.state_dict(),
                       metrics=metrics, blocks_consumed=pos.step * batches.blocks_per_step())

    def evaluate_dev() -> dict[str, float]:
        """Dev loss/ppl (of the moving average when there is one); a new best is saved as checkpoint_best.pt."""
        with maybe_averaged(updater.ema):
            dev = _ppl(evaluate(model, dev_data, cfg.batch_size, device, d))
            improved = dev["loss"] < pos.best_dev_loss
            if improved:
                pos.best_dev_loss, pos.best_step = dev["loss"], pos.step
                if d.main:
                    save_unit_lm(model, dictionary, run.path / "checkpoint_best.pt",
                                 extra={"step": pos.step, "dev_ppl": dev["ppl"]})
        log.log(pos.step, dev_loss=dev["loss"], dev_loss_bits=dev["loss_bits"], dev_ppl=dev["ppl"])
        if d.main:
            logger.info("step %d: dev loss %.4f nats (%.4f bits), ppl %.3f%s", pos.step, dev["loss"],
                        dev["loss_bits"], dev["ppl"], " (best)" if improved else "")
        return dev

    # Update s takes its blocks from positions that depend on s alone (lm_data.StepBatches): resuming at step s
    # replays exactly, with any number of loader workers.
    batches = StepBatches(train_data, cfg.batch_size * cfg.grad_accum, cfg.seed, d.rank, d.world_size)
    loader = step_loader(batches, pos, cfg.max_steps, cfg.num_workers, device)
    if d.main:
        logger.info(
            "%s on %s: %d parameters; train %d utterances, %d tokens, %d blocks of %d; dev %d tokens; unigram dev "
            "ppl %.2f", f"resuming at step {pos.step}" if pos.step else "starting",
            f"{d.world_size} processes" if d.active else device, updater.num_parameters, train_data.num_utterances,
            train_data.num_targets, len(train_data), cfg.tokens_per_sample, dev_data.num_targets, math.exp(unigram),
        )
    clock = Clock(pos)
    window = [0.0, 0]  # summed train NLL and targets since the last log line
    window_start, session_tokens = clock.session_start, 0
    train_loss, dev = math.nan, None
    with run.logger(pos.step) as log, run.progress(cfg.max_steps, pos.step, every=cfg.log_every) as bar:
        if pos.step == 0:
            log.log(0, unigram_dev_loss=unigram, unigram_dev_ppl=math.exp(unigram))
        model.train()
        for source, target in loader:
            lr = optim.lr_at(pos.step, cfg.max_steps)
            for micro_source, micro_target in zip(source.chunk(cfg.grad_accum), target.chunk(cfg.grad_accum)):
                with updater.precision.autocast():
                    nll, count = token_nll(model, micro_source.to(device), micro_target.to(device), pad)
                updater.backward(nll, count)
            stats = updater.step(lr)
            pos.step += 1
            window[0] += stats.loss * stats.terms
            window[1] += stats.terms
            session_tokens += stats.terms
            bar.update(loss=stats.loss, lr=lr)
            last = pos.step == cfg.max_steps
            if pos.step % cfg.log_every == 0 or last:
                train_loss = window[0] / max(window[1], 1)
                now = time.monotonic()
                log.log(pos.step, train_loss=train_loss, lr=lr, grad_norm=stats.grad_norm,
                        tokens_per_s=window[1] / max(now - window_start, 1e-9),
                        epoch=batches.epoch_of(pos.step))
                window, window_start = [0.0, 0], now
            if pos.step % cfg.eval_every == 0 or last:
                dev = evaluate_dev()
            if pos.step % cfg.save_every == 0 or last:
                save()

        if dev is None:  # a finished run resumed: nothing trained, report what is there
            with maybe_averaged(updater.ema):
                dev = _ppl(evaluate(model, dev_data, cfg.batch_size, device, d))
    metrics = {
        "step": pos.step,
        "train_loss": None if math.isnan(train_loss) else train_loss,  # None: resumed a finished run
        "dev_loss": dev["loss"],
        "dev_loss_bits": dev["loss_bits"],
        "dev_ppl": dev["ppl"],
        "best_dev_ppl": math.exp(pos.best_dev_loss),
        "best_step": pos.best_step,
        "unigram_dev_ppl": math.exp(unigram),
        "num_params": updater.num_parameters,
        "train_tokens": train_data.num_targets,
        "dev_tokens": dev_data.num_targets,
    }
    return finish(run, clock, metrics, ("train_tokens_per_s", session_tokens), f"unit LM pretraining ({cfg.model})")


# --------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, PretrainConfig)


def run(args: argparse.Namespace) -> int:
    return run_command(args, PretrainConfig, pretrain)
