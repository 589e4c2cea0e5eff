"""Train a task on the frozen unit LM: prompts or another method, with early stopping on dev.

    speechprompt train --config recipes/synthetic_commands/conf/prompt.yaml seed=1 run_dir=exp/p1
    torchrun --nproc_per_node 2 -m speechprompt.cli train --config C.yaml run_dir=exp/p1_ddp

Every key of the config (listed below) can be overridden as ``key=value``; nested keys with dots
(``optim.lr=1e-3``, ``method.options.length=10``). The run directory receives:

    config.yaml               the resolved config
    log.csv                   step, metric, value (train loss, learning rate, gradient norm, dev metrics)
    learning_curves.png       train loss and dev metrics against the step
    best.safetensors/.json    the task checkpoint with the best dev metric (what ``infer``/``evaluate`` take)
    last.safetensors/.json    the checkpoint of the last evaluation
    train_state.pt            optimizer, RNG and loop state, written at every evaluation: a killed run resumes
                              from here (resume=auto, the default)
    metrics.json              dev metrics of the best checkpoint, trainable parameters, checkpoint bytes,
                              peak memory and mean step time
    dev.metrics.json, dev.predictions.jsonl, dev.confusion.png   the best checkpoint on dev

Runs are reproducible: the seed fixes initialisation, shuffling (batch order of epoch e comes from seed and e) and
dropout, and a resumed run continues exactly where the saved state was taken. An update takes ``batch_size x
grad_accum x processes`` utterances (one length-grouped batch, split over processes and micro-batches), so N
processes under torchrun train like one process with N times the batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import logging
import math
import os
import time
from typing import Any

import torch

from speechprompt import config as C
from speechprompt.checkpoint import base_fingerprint, base_record, save_checkpoint
from speechprompt.config import ConfigError, option
from speechprompt.devices import torch_threads
from speechprompt.fileio import write_json
from speechprompt.models.hf_decoders import load_speech_lm
from speechprompt.models.transformer import set_activation_checkpointing
from speechprompt.rng import seed_everything
from speechprompt.tasks.data import batch_indices, collate_rows, load_split, units_summary
from speechprompt.tasks.evaluation import evaluate_split, write_report
from speechprompt.tasks.metrics import METRICS
from speechprompt.tasks.registry import Task, build_task, task_kind
from speechprompt.training.config import RUN_KEYS_MAY_CHANGE, RunOptions
from speechprompt.training.distributed import Dist, distributed, shard_frozen_backbone
from speechprompt.training.early_stopping import BestTracker
from speechprompt.training.ema import maybe_averaged
from speechprompt.training.optim import OptimConfig, Updater, check_schedule_unchanged
from speechprompt.training.precision import MixedPrecision
from speechprompt.training.run import RunDir, peak_memory
from speechprompt.tuning import MethodConfig, build_method, freeze_except
from speechprompt.verbalizers import VerbalizerConfig, VerbalizerKind, build_verbalizer

logger = logging.getLogger(__name__)

KIND = "train"
STATE_VERSION = 2


class TaskType(str, enum.Enum):
    CLASSIFICATION = "classification"
    MULTISLOT = "multislot"
    SEQUENCE = "sequence"


@dataclasses.dataclass
class DataConfig:
    """The task's data: line-aligned .units and .labels files (as ``speechprompt prepare`` and ``synth`` write)."""

    train_units: str = option(help="training units file")
    train_labels: str = option(help="training labels file (one label or transcript per line)")
    dev_units: str | None = option(None, help="dev units file for model selection and early stopping")
    dev_labels: str | None = option(None, help="dev labels file")
    task: TaskType = option(
        TaskType.CLASSIFICATION,
        help="classification (one label), multislot (label 'a|b|c', one token per slot; accuracy = all slots "
        "right) or sequence (text through the sentencepiece verbalizer; WER/CER)",
    )
    max_len: int | None = option(None, help="keep at most this many units of each input (null: all)")

    def __post_init__(self) -> None:
        if (self.dev_units is None) != (self.dev_labels is None):
            raise ConfigError("data.dev_units and data.dev_labels go together")
        if self.max_len is not None and self.max_len < 1:
            raise ConfigError(f"data.max_len must be positive, got {self.max_len}")


@dataclasses.dataclass
class DecodeConfig:
    """Decoding of sequence tasks (classification always reports greedy and constrained predictions)."""

    beam_size: int = option(1, help="1: greedy; more: beam search")
    max_new_tokens: int = option(200, help="longest output in tokens, </s> included")
    length_penalty: float = option(1.0, help="beam score / length ** length_penalty (0: none)")

    def __post_init__(self) -> None:
        if self.beam_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("decode.beam_size and decode.max_new_tokens must be >= 1")


# train's `base_dtype` -> the dtype load_speech_lm holds the frozen weights in (None: as stored, float32).
BASE_DTYPES: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(kw_only=True)
class TrainConfig(RunOptions):
    """A training run on the frozen unit LM. Paths are as given (relative to the working directory)."""

    data: DataConfig = option(help="data files and task type")
    base: str = option(help="the frozen base unit LM: a fairseq checkpoint (its dict.txt beside it), or a slamkit "
                       "(TWIST/SLAM) or Hugging Face OPT/LLaMA/Qwen2 causal-LM directory (docs/speech_lms.md)")
    base_dtype: str = option("float32", help="dtype the frozen base is held in: float32, or bfloat16 (half the memory "
                             "of a large speech LM; the method's own tensors stay float32)")
    method: MethodConfig = option(help="what trains", default_factory=MethodConfig)
    verbalizer: VerbalizerConfig = option(help="labels <-> unit tokens", default_factory=VerbalizerConfig)
    optim: OptimConfig = option(help="optimizer", default_factory=OptimConfig)
    decode: DecodeConfig = option(help="decoding of sequence tasks", default_factory=DecodeConfig)
    run_dir: str = option("exp/train", help="where the run's files go (a moved run directory resumes where it is)")
    batch_size: int = option(32, help="utterances per micro-batch and process (see grad_accum)")
    max_epochs: int = option(50, help="passes over the training data at most")
    max_steps: int | None = option(None, help="updates at most (null: max_epochs decides)")
    eval_every: int = option(0, help="evaluate on dev every N updates (0: after every epoch)")
    patience: int = option(5, help="stop after this many evaluations without a better dev metric (0: never)")
    metric: str | None = option(
        None, help="dev metric to select on, '<decoder>.<metric>' (null: the task's default, e.g. greedy.accuracy, "
        "greedy.wer; 'loss' also works)"
    )
    eval_batch_size: int = option(64, help="utterances per batch when evaluating")
    dropout: bool = option(
        True, help="keep the frozen LM's dropout active while training (as fairseq does when prompt tuning); "
        "false trained the demo's prompts and probe better (docs/demo.md)"
    )
    fsdp: bool = option(False, help="under torchrun, shard the frozen base's weights over the processes (FSDP2), "
                        "for a backbone one device cannot hold; the method's tensors stay replicated, inside the "
                        "backbone too (LoRA, adapters, BitFit, masks). Not for full fine-tuning")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("batch_size", "max_epochs", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.eval_every < 0 or self.patience < 0:
            raise ConfigError("eval_every and patience must be >= 0")
        if self.base_dtype not in BASE_DTYPES:
            raise ConfigError(f"base_dtype must be one of {', '.join(BASE_DTYPES)}, got {self.base_dtype!r}")
        sequence_verbalizer = self.verbalizer.kind is VerbalizerKind.SEQUENCE
        if (self.data.task is TaskType.SEQUENCE) != sequence_verbalizer and self.method.name != "linear_probe":
            raise ConfigError("data.task=sequence goes with verbalizer.kind=sequence, and only with it")
        if self.method.name == "linear_probe" and self.data.task is TaskType.SEQUENCE:
            raise ConfigError("the linear probe classifies; it cannot be trained on a sequence task")
        if self.data.task is TaskType.MULTISLOT and self.verbalizer.slot_separator is None:
            if self.verbalizer.kind is VerbalizerKind.LEARNABLE:
                raise ConfigError("data.task=multislot needs a fixed verbalizer (freq, random or map)")
            self.verbalizer.slot_separator = "|"  # Fluent Speech Commands' action|object|location


# Keys a resumed run may change (checked against the schedule: see check_schedule_unchanged).
MAY_CHANGE = RUN_KEYS_MAY_CHANGE | {"max_epochs", "max_steps", "patience", "eval_batch_size"}


def _selection(task: Task, metric: str | None) -> tuple[str, bool]:
    """The dev metric key and whether higher is better."""
    key = metric or task.default_metric
    if key == "loss":
        return key, False
    name = key.split(".")[-1]
    if name not in METRICS:
        raise ConfigError(f"metric {key!r}: unknown metric {name!r}; known: loss, {', '.join(METRICS)}")
    return key, METRICS[name].higher_is_better


@dataclasses.dataclass
class _Position:
    """Where the loop is, and its timing: with the tensors, optimizer and RNG, all that a resumed run needs."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    evaluated_step: int | None = None
    step_seconds: float = 0.0
    timed_steps: int = 0
    train_seconds: float = 0.0


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run; returns what is written to ``metrics.json``."""
    with torch_threads(cfg.threads), distributed(cfg.device) as (d, device), \
            RunDir(cfg.run_dir, KIND, cfg, STATE_VERSION, MAY_CHANGE, cfg.resume, d) as run:
        if run.saved is not None and run.saved["summary"] is not None and _finished(cfg, run.saved):
            logger.info("%s: the run already finished; nothing to do", run.path)
            return run.saved["summary"]
        return _train(cfg, run, d, device)


def _finished(cfg: TrainConfig, saved: dict[str, Any]) -> bool:
    """Whether a finished run is still finished under ``cfg``: only a longer budget or more patience continues it."""
    pos, best = saved["position"], saved["best"]
    if cfg.patience > 0 and best["bad_evals"] >= cfg.patience:
        return True
    if cfg.max_steps is not None:
        return pos["step"] >= cfg.max_steps
    return pos["epoch"] >= cfg.max_epochs


def _train(cfg: TrainConfig, run: RunDir, d: Dist, device: torch.device) -> dict[str, Any]:
    seed_everything(cfg.seed)
    model, vocab = load_speech_lm(cfg.base, dtype=BASE_DTYPES[cfg.base_dtype])
    fingerprint = base_fingerprint(model)  # before any method attaches
    base_params = sum(p.numel() for p in model.parameters())
    train_split = load_split(cfg.data.train_units, cfg.data.train_labels, vocab, cfg.data.max_len, "train")
    dev_split = load_split(cfg.data.dev_units, cfg.data.dev_labels, vocab, cfg.data.max_len, "dev") \
        if cfg.data.dev_units else None
    probe = cfg.method.name == "linear_probe"
    verbalizer = None if probe else build_verbalizer(cfg.verbalizer, train_split.labels, train_split.tokens, vocab)
    if verbalizer is not None:
        verbalizer.check_vocab(vocab)
    labels = sorted(set(train_split.labels)) if probe else list(verbalizer.labels)
    method = build_method(cfg.method.resolved(), model)
    params = freeze_except(model, method)
    kind = task_kind(cfg.data.task.value, None if probe else verbalizer.kind, cfg.method.name)
    decode = C.to_dict(cfg.decode) if kind == "sequence" else {}
    task = build_task(kind, model, method, verbalizer, labels, decode)
    head = task.head
    if head is not None:
        params = params + [p for p in head.parameters() if p.requires_grad]
    for module in (model, method, head):
        if module is not None:
            module.to(device)
    if cfg.activation_checkpointing:
        set_activation_checkpointing(model)
    sharded = cfg.fsdp and d.active
    if sharded:
        shard_frozen_backbone(model, params)
    select_key, higher_better = _selection(task, cfg.metric)
    updater = Updater(params, cfg.optim, MixedPrecision(cfg.precision, device), d, cfg.ema_decay)

    global_batch = cfg.batch_size * cfg.grad_accum * d.world_size
    total_steps = cfg.max_steps or cfg.max_epochs * math.ceil(len(train_split) / global_batch)
    pos, best = _Position(), BestTracker(higher_better, cfg.patience)
    best_state: dict[str, Any] | None = None
    if run.saved is not None:
        saved = run.saved
        check_schedule_unchanged(cfg.optim, saved["total_steps"], total_steps, saved["position"]["step"],
                                 run.state_path)
        method.load_state_dict(saved["method"])
        if head is not None:
            head.load_state_dict(saved["head"])
        updater.load_state_dict(saved["updater"])
        best.load_state_dict(saved["best"])
        pos = _Position(**saved["position"])
        best_state = saved["best_state"]
        run.restore_rng(saved)
        logger.info("resuming %s at step %d (epoch %d)", run.path, pos.step, pos.epoch)

    meta = {
        "task": {"type": cfg.data.task.value, "kind": kind, "labels": labels, "decode": decode},
        "method": {"name": cfg.method.name, "config": C.to_dict(cfg.method.resolved())},
        "verbalizer": verbalizer.to_dict() if verbalizer is not None else None,
        "base": base_record(cfg.base, fingerprint, parameters=base_params),
        "units": _units_meta(cfg),
        "config": C.to_dict(cfg),
    }

    def snapshot() -> dict[str, Any]:
        return {"method": {k: v.detach().cpu().clone() for k, v in method.export_state_dict().items()},
                "head": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()} if head else None}

    def save_state(summary: dict[str, Any] | None = None) -> None:
        run.save_state(
            position=dataclasses.asdict(pos), best=best.state_dict(), best_state=best_state, summary=summary,
            total_steps=total_steps, updater=updater.state_dict(),
            method={k: v.detach().cpu() for k, v in method.state_dict().items()},
            head={k: v.detach().cpu() for k, v in head.state_dict().items()} if head else None,
        )

    def evaluate_and_save() -> bool:
        """Evaluate on dev (the main process), save last/best and the training state; True: early stopping says
        stop."""
        nonlocal best_state
        pos.evaluated_step = pos.step
        model.eval()
        metrics: dict[str, Any] = {}
        with maybe_averaged(updater.ema):
            if dev_split is not None and (d.main or sharded):  # a sharded backbone needs every process
                metrics, _ = evaluate_split(task, dev_split, cfg.eval_batch_size, device)
                if d.main:
                    log.log(pos.step, **{f"dev_{k}": v for k, v in metrics.items() if k != "n"})
            snap = snapshot()
        metrics = d.broadcast_object(metrics)
        # Without dev, the last evaluation is the best.
        value = metrics[select_key] if dev_split is not None else (pos.step if higher_better else -pos.step)
        training = {"step": pos.step, "dev": metrics}
        if d.main:
            save_checkpoint(run.path / "last", snap["method"], snap["head"], {**meta, "training": training})
        if best.update(value, pos.step):
            best_state = snap
            if d.main:
                save_checkpoint(run.path / "best", snap["method"], snap["head"], {**meta, "training": training})
        logger.info("step %d: dev %s = %s (best %s at step %s)", pos.step, select_key, value, best.best,
                    best.best_step)
        save_state()
        return best.should_stop

    # -- the loop -----------------------------------------------------------------------------------------------
    stopped = "max_epochs"
    session_start = time.perf_counter()
    with run.logger(pos.step) as log, \
            run.progress(total_steps, pos.step, every=cfg.log_every) as bar:
        done = False
        while pos.epoch < cfg.max_epochs and not done:
            generator = torch.Generator().manual_seed(cfg.seed * 100_003 + pos.epoch)  # the same order on resume
            groups = batch_indices(train_split, global_batch, shuffle=True, generator=generator)
            for i in range(pos.batch_in_epoch, len(groups)):
                if pos.step >= total_steps:  # max_steps, checked before an update so a finished epoch counts
                    stopped, done = "max_steps", True
                    break
                model.train(cfg.dropout)
                method.train()
                if head is not None:
                    head.train()
                lr = cfg.optim.lr_at(pos.step, total_steps)
                t0 = time.perf_counter()
                for rows in _micro_batches(groups[i], d, cfg.grad_accum, keep_empty=sharded):
                    with updater.precision.autocast():
                        # A sharded backbone gathers each layer's weights from every process, so every process
                        # makes every pass: an empty share runs one row of the batch, at weight zero.
                        loss_sum, terms = task.loss(collate_rows(train_split, rows or groups[i][:1], verbalizer)
                                                    .to(device))
                    if not rows:
                        loss_sum, terms = loss_sum * 0.0, 0
                    if sharded and not terms:
                        loss_sum.backward()  # zero gradients, but the backward's gathers happen on every process
                        loss_sum = loss_sum.detach()
                    updater.backward(loss_sum, terms)
                stats = updater.step(lr)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if pos.step > 0:  # the first update pays one-off costs (allocations, kernel selection)
                    pos.step_seconds += time.perf_counter() - t0
                    pos.timed_steps += 1
                pos.step += 1
                pos.batch_in_epoch = i + 1
                bar.update(loss=stats.loss, lr=lr)
                if pos.step % cfg.log_every == 0:
                    log.log(pos.step, train_loss=stats.loss, lr=lr, grad_norm=stats.grad_norm)
                if cfg.eval_every and pos.step % cfg.eval_every == 0 and evaluate_and_save():
                    stopped, done = "early_stopping", True
                    break
            else:
                pos.epoch += 1
                pos.batch_in_epoch = 0
                if not cfg.eval_every and evaluate_and_save():
                    stopped, done = "early_stopping", True
        if pos.evaluated_step != pos.step:  # updates since the last evaluation (max_steps, a partial interval)
            evaluate_and_save()
    pos.train_seconds += time.perf_counter() - session_start

    # -- final report with the best checkpoint ------------------------------------------------------------------
    summary: dict[str, Any] = {
        "method": cfg.method.name,
        "task": cfg.data.task.value,
        "seed": cfg.seed,
        "select_metric": select_key,
        "best_step": best.best_step,
        "steps": pos.step,
        "epochs": pos.epoch,
        "stopped": stopped,
        "trainable_params": updater.num_parameters,
        "mean_step_seconds": pos.step_seconds / pos.timed_steps if pos.timed_steps else None,
        "train_seconds": round(pos.train_seconds, 3),
        "processes": d.world_size,
        **peak_memory(device),
    }
    if d.main or sharded:
        assert best_state is not None
        method.load_exported_state_dict({k: v.to(device) for k, v in best_state["method"].items()})
        if head is not None:
            head.load_state_dict(best_state["head"])
        model.eval()
        if dev_split is not None:
            metrics, preds = evaluate_split(task, dev_split, cfg.eval_batch_size, device)
            if d.main:
                write_report(task, dev_split, metrics, preds, run.path)
            summary["dev"] = metrics
    if d.main:
        best_path = save_checkpoint(run.path / "best", best_state["method"], best_state["head"],
                                    {**meta, "training": dict(summary)})
        summary["checkpoint"] = str(best_path)
        summary["checkpoint_bytes"] = best_path.stat().st_size
        write_json(run.path / "metrics.json", summary)
        run.plot_learning_curves(cfg.method.name)
    summary = d.broadcast_object(summary)
    save_state(summary)
    return summary


def _micro_batches(rows: list[int], d: Dist, grad_accum: int, keep_empty: bool = False) -> list[list[int]]:
    """This process's share of one update's utterances, cut into ``grad_accum`` near-equal micro-batches (a short
    last batch may leave some empty: they are skipped, or kept with ``keep_empty``, so that every process makes
    ``grad_accum`` passes)."""
    mine = d.shard(rows)
    n = len(mine)
    pieces = [mine[n * j // grad_accum : n * (j + 1) // grad_accum] for j in range(grad_accum)]
    return pieces if keep_empty else [p for p in pieces if p]


def _units_meta(cfg: TrainConfig) -> dict[str, Any]:
    """The audio -> units pipeline of the training data, from the summary ``prepare`` wrote beside it."""
    summary = units_summary(cfg.data.train_units) or {}
    quantizer = summary.get("quantizer") or {}
    return {
        "features": summary.get("features"),
        "quantizer": quantizer or None,
        "dedup": summary.get("dedup"),
        "max_len": cfg.data.max_len,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config (keys below)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-3")
    parser.epilog = "config keys:\n" + C.describe(TrainConfig)


def run(args: argparse.Namespace) -> int:
    cfg = C.load_config(TrainConfig, args.config, args.overrides)
    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # one line per run, not per process
        print(json.dumps({k: v for k, v in summary.items() if k != "dev"} | {"dev": summary.get("dev")}))
    return 0

