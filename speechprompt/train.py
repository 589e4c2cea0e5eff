"""Train a task on the frozen unit LM: prompts or another method, with early stopping on dev.

    speechprompt train --config recipes/synthetic_commands/conf/prompt.yaml seed=1 run_dir=exp/p1

Every key of the config (listed below) can be overridden as ``key=value``; nested keys with dots
(``optim.lr=1e-3``, ``method.options.length=10``). The run directory receives:

    config.yaml               the resolved config
    log.csv                   step, metric, value (train loss, learning rate, dev metrics)
    learning_curves.png       train loss and dev metrics against the step
    best.safetensors/.json    the task checkpoint with the best dev metric (what ``infer``/``evaluate`` take)
    last.safetensors/.json    the checkpoint of the last evaluation
    train_state.pt            optimizer, RNG and loop state: a killed run resumes from here (resume=true)
    metrics.json              dev metrics of the best checkpoint, trainable parameters, checkpoint bytes,
                              peak memory and mean step time
    dev.metrics.json, dev.predictions.jsonl, dev.confusion.png   the best checkpoint on dev

Runs are reproducible: the seed fixes initialisation, shuffling (batch order of epoch e comes from seed + e) and
dropout, and a resumed run continues exactly where the saved state was taken.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import logging
import math
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from speechprompt import config as C
from speechprompt.checkpoint import base_fingerprint, save_checkpoint
from speechprompt.config import ConfigError, option
from speechprompt.devices import resolve_device, torch_threads
from speechprompt.evaluate import build_task, evaluate_split, task_kind, write_report
from speechprompt.fileio import torch_save, write_json
from speechprompt.tasks.data import batches, load_split, units_summary
from speechprompt.tasks.metrics import METRICS
from speechprompt.tuning import build_method, freeze_except, method_config
from speechprompt.verbalizers import VerbalizerConfig, VerbalizerKind, build_verbalizer

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"


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
class MethodConfig:
    """What trains: a tuning method (prompt, prefix, adapter, lora, bitfit, mask) or a baseline (full_finetune,
    linear_probe), with that method's own options."""

    name: str = option("prompt", help="prompt | prefix | adapter | lora | bitfit | mask | full_finetune | "
                       "linear_probe")
    options: dict[str, Any] = option({}, help="the method's config fields, e.g. {length: 5, deep: true} for prompt")

    def __post_init__(self) -> None:
        method_config(self.name, self.options)  # unknown names, keys and bad values fail here, not mid-run

    def resolved(self) -> Any:
        return method_config(self.name, self.options)


@dataclasses.dataclass
class OptimConfig:
    """Adam and the learning-rate schedule (SpeechPrompt: Adam(0.9, 0.98), lr 5e-3 for prompts, clip 1.0)."""

    lr: float = option(5e-3, help="peak learning rate")
    betas: list[float] = option([0.9, 0.98], help="Adam betas")
    eps: float = option(1e-8, help="Adam epsilon")
    weight_decay: float = option(0.0, help="decoupled weight decay (AdamW) when > 0")
    clip: float = option(1.0, help="clip the gradient norm to this (0: no clipping)")
    schedule: str = option("constant", help="constant | inverse_sqrt | cosine (after warmup)")
    warmup_steps: int = option(0, help="linear warmup updates")

    def __post_init__(self) -> None:
        from speechprompt.schedule import get_schedule

        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.lr <= 0 or self.clip < 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ConfigError("optim.lr must be positive; clip, warmup_steps and weight_decay non-negative")
        try:
            get_schedule(self.schedule)
        except ValueError as e:
            raise ConfigError(f"optim.schedule: {e}") from None


@dataclasses.dataclass
class DecodeConfig:
    """Decoding of sequence tasks (classification always reports greedy and constrained predictions)."""

    beam_size: int = option(1, help="1: greedy; more: beam search")
    max_new_tokens: int = option(200, help="longest output in tokens, </s> included")
    length_penalty: float = option(1.0, help="beam score / length ** length_penalty (0: none)")

    def __post_init__(self) -> None:
        if self.beam_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("decode.beam_size and decode.max_new_tokens must be >= 1")


@dataclasses.dataclass
class TrainConfig:
    """A training run. Paths are as given (relative to the working directory)."""

    data: DataConfig = option(help="data files and task type")
    base: str = option(help="the frozen base unit LM checkpoint (its dict.txt beside it)")
    method: MethodConfig = option(help="what trains", default_factory=MethodConfig)
    verbalizer: VerbalizerConfig = option(help="labels <-> unit tokens", default_factory=VerbalizerConfig)
    optim: OptimConfig = option(help="optimizer", default_factory=OptimConfig)
    decode: DecodeConfig = option(help="decoding of sequence tasks", default_factory=DecodeConfig)
    run_dir: str = option("exp/train", help="where the run's files go")
    batch_size: int = option(32, help="utterances per update")
    max_epochs: int = option(50, help="passes over the training data at most")
    max_steps: int | None = option(None, help="updates at most (null: max_epochs decides)")
    eval_every: int = option(0, help="evaluate on dev every N updates (0: after every epoch)")
    patience: int = option(5, help="stop after this many evaluations without a better dev metric (0: never)")
    metric: str | None = option(
        None, help="dev metric to select on, '<decoder>.<metric>' (null: the task's default, e.g. greedy.accuracy, "
        "greedy.wer; 'loss' also works)"
    )
    eval_batch_size: int = option(64, help="utterances per batch when evaluating")
    seed: int = option(0, help="seed of initialisation, shuffling and dropout")
    dropout: bool = option(
        True, help="keep the frozen LM's dropout active while training (as fairseq does when prompt tuning)"
    )
    device: str = option("auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    resume: bool = option(True, help="continue from run_dir/train_state.pt if it is there")
    log_every: int = option(10, help="log the train loss every N updates")
    ema_decay: float = option(
        0.0, help="evaluate and save an exponential moving average of the trained tensors, updated with this decay "
        "after every update (0: off; 0.98 averages over ~50 updates). Smooths the noisy updates of prompt tuning"
    )
    threads: int = option(0, help="CPU threads of torch ops (0: torch's default); 1 is often fastest on a small or "
                          "shared CPU")

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_epochs", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.eval_every < 0 or self.patience < 0:
            raise ConfigError("eval_every and patience must be >= 0")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        sequence_verbalizer = self.verbalizer.kind is VerbalizerKind.SEQUENCE
        if (self.data.task is TaskType.SEQUENCE) != sequence_verbalizer and self.method.name != "linear_probe":
            raise ConfigError("data.task=sequence goes with verbalizer.kind=sequence, and only with it")
        if self.method.name == "linear_probe" and self.data.task is TaskType.SEQUENCE:
            raise ConfigError("the linear probe classifies; it cannot be trained on a sequence task")
        if self.data.task is TaskType.MULTISLOT and self.verbalizer.slot_separator is None:
            if self.verbalizer.kind is VerbalizerKind.LEARNABLE:
                raise ConfigError("data.task=multislot needs a fixed verbalizer (freq, random or map)")
            self.verbalizer.slot_separator = "|"  # Fluent Speech Commands' action|object|location


# Keys a resumed run may change. run_dir: a run directory that was moved or copied resumes where it now is.
_RESUMABLE_CHANGES = {
    "threads", "resume", "max_epochs", "max_steps", "patience", "device", "log_every", "eval_batch_size", "run_dir",
}


def _selection(task: Any, metric: str | None) -> tuple[str, bool]:
    """The dev metric key and whether higher is better."""
    key = metric or task.default_metric
    if key == "loss":
        return key, False
    name = key.split(".")[-1]
    if name not in METRICS:
        raise ConfigError(f"metric {key!r}: unknown metric {name!r}; known: loss, {', '.join(METRICS)}")
    return key, METRICS[name].higher_is_better


def _peak_memory(device: torch.device) -> dict[str, int | None]:
    """Peak resident set size of this process and, on CUDA, the peak allocated by torch (bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    cuda = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"peak_rss_bytes": int(rss), "peak_cuda_allocated_bytes": cuda}


def _wide_log(run_dir: Path) -> list[dict[str, Any]]:
    """``log.csv`` (long form) as one row per step, for the learning-curve plot."""
    from speechprompt.runlog import read_log

    rows: dict[int, dict[str, Any]] = {}
    for metric, points in read_log(run_dir / "log.csv").items():
        for step, value in points:
            rows.setdefault(step, {"step": step})[metric] = value
    return [rows[s] for s in sorted(rows)]


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run; returns what is written to ``metrics.json``."""
    with torch_threads(cfg.threads):
        return _train(cfg)


def _train(cfg: TrainConfig) -> dict[str, Any]:
    from speechprompt.models.unit_lm import load_unit_lm
    from speechprompt.plots import plot_learning_curves
    from speechprompt.runlog import RunLogger

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / STATE_FILE
    saved = torch.load(state_path, map_location="cpu", weights_only=True) if cfg.resume and state_path.is_file() \
        else None
    if saved is not None:
        _check_resumable(saved["config"], C.to_dict(cfg), state_path)
        if saved["finished"]:
            logger.info("%s: the run already finished; nothing to do", run_dir)
            return C.to_dict(saved["summary"]) if saved.get("summary") else {}
    C.save_config(cfg, run_dir / "config.yaml")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    # -- model, data, verbalizer, method, task head ------------------------------------------------------------
    model, dictionary = load_unit_lm(cfg.base)
    n_units = len(dictionary) - dictionary.nspecial
    fingerprint = base_fingerprint(model)  # before any method attaches
    base_params = sum(p.numel() for p in model.parameters())
    train_split = load_split(cfg.data.train_units, cfg.data.train_labels, n_units, cfg.data.max_len, "train")
    dev_split = load_split(cfg.data.dev_units, cfg.data.dev_labels, n_units, cfg.data.max_len, "dev") \
        if cfg.data.dev_units else None
    probe = cfg.method.name == "linear_probe"
    verbalizer = None if probe else build_verbalizer(cfg.verbalizer, train_split.labels, train_split.tokens, n_units)
    if verbalizer is not None:
        verbalizer.check_vocab(len(dictionary))
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
    unique = list({id(p): p for p in params}.values())  # a tied tensor (full FT's embeddings) counts once
    trainable = sum(p.numel() for p in unique)
    select_key, higher_better = _selection(task, cfg.metric)

    optimizer = (torch.optim.AdamW if cfg.optim.weight_decay > 0 else torch.optim.Adam)(
        params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay
    )
    # Polyak averaging: the average is what dev sees and what checkpoints hold; training continues from the live
    # tensors.
    ema = [p.detach().clone() for p in unique] if cfg.ema_decay else None
    steps_per_epoch = math.ceil(len(train_split) / cfg.batch_size)
    total_steps = cfg.max_steps or cfg.max_epochs * steps_per_epoch
    from speechprompt.schedule import lr_at

    # -- state (fresh or resumed) ---------------------------------------------------------------------------------
    st = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": None, "best_step": None, "bad_evals": 0,
          "step_seconds": 0.0, "timed_steps": 0, "train_seconds": 0.0, "evaluated_step": None}
    best_state: dict[str, Any] | None = None
    if saved is not None:
        method.load_state_dict(saved["method"])
        if head is not None:
            head.load_state_dict(saved["head"])
        optimizer.load_state_dict(saved["optimizer"])
        if ema is not None:
            for e, saved_e in zip(ema, saved["ema"]):
                e.copy_(saved_e)
        st.update(saved["loop"])
        best_state = saved["best_state"]
        torch.set_rng_state(saved["rng"]["torch"])
        if device.type == "cuda" and saved["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(saved["rng"]["cuda"], device)
        logger.info("resuming %s at step %d (epoch %d)", run_dir, st["step"], st["epoch"])
    log = RunLogger(run_dir, resume_from=st["step"] if saved is not None else None, tensorboard=False)

    meta = {
        "task": {"type": cfg.data.task.value, "kind": kind, "labels": labels, "decode": decode},
        "method": {"name": cfg.method.name, "config": C.to_dict(cfg.method.resolved())},
        "verbalizer": verbalizer.to_dict() if verbalizer is not None else None,
        # As given (portable when relative to a repository root) and absolute (found from any working directory).
        "base": {"path": cfg.base, "abs_path": str(Path(cfg.base).resolve()), "fingerprint": fingerprint,
                 "parameters": base_params},
        "units": _units_meta(cfg),
        "config": C.to_dict(cfg),
    }

    def snapshot() -> dict[str, Any]:
        return {"method": {k: v.detach().cpu().clone() for k, v in method.export_state_dict().items()},
                "head": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()} if head else None}

    def save_training_state(finished: bool, summary: dict | None = None) -> None:
        torch_save({
            "config": C.to_dict(cfg), "finished": finished, "summary": summary, "loop": dict(st),
            "method": {k: v.detach().cpu() for k, v in method.state_dict().items()},
            "head": {k: v.detach().cpu() for k, v in head.state_dict().items()} if head else None,
            "optimizer": optimizer.state_dict(), "best_state": best_state,
            "ema": [e.detach().cpu() for e in ema] if ema is not None else None,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
        }, state_path)

    @contextlib.contextmanager
    def averaged() -> Iterator[None]:
        """The EMA tensors in place of the live ones, for evaluating and snapshotting (no-op without EMA)."""
        if ema is None:
            yield
            return
        live = [p.detach().clone() for p in unique]
        with torch.no_grad():
            for p, e in zip(unique, ema):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, x in zip(unique, live):
                    p.copy_(x)

    def evaluate_and_save() -> bool:
        """Evaluate on dev, save last/best; True when early stopping says stop."""
        nonlocal best_state
        st["evaluated_step"] = st["step"]
        model.eval()
        with averaged():
            if dev_split is not None:
                metrics, _ = evaluate_split(task, dev_split, cfg.eval_batch_size, device)
                log.log(st["step"], **{f"dev_{k}": v for k, v in metrics.items() if k != "n"})
                value = metrics[select_key]
            else:
                metrics, value = {}, -st["step"] if not higher_better else st["step"]  # no dev: the last is best
            snap = snapshot()
        save_checkpoint(run_dir / "last", snap["method"], snap["head"],
                        {**meta, "training": {"step": st["step"], "dev": metrics}})
        better = st["best"] is None or (value > st["best"] if higher_better else value < st["best"])
        if better:
            st.update(best=value, best_step=st["step"], bad_evals=0)
            best_state = snap
            save_checkpoint(run_dir / "best", snap["method"], snap["head"],
                            {**meta, "training": {"step": st["step"], "dev": metrics}})
        else:
            st["bad_evals"] += 1
        logger.info("step %d: dev %s = %s (best %s at step %s)", st["step"], select_key, value, st["best"],
                    st["best_step"])
        stop = cfg.patience > 0 and st["bad_evals"] >= cfg.patience
        save_training_state(False)
        return stop

    # -- the loop ---------------------------------------------------------------------------------------------------
    stopped = "max_epochs"
    start = time.perf_counter()
    done = False
    while st["epoch"] < cfg.max_epochs and not done:
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + st["epoch"])  # the same order on resume
        epoch_batches = batches(train_split, verbalizer, cfg.batch_size, shuffle=True, generator=generator)
        for i in range(st["batch_in_epoch"], len(epoch_batches)):
            batch = epoch_batches[i].to(device)
            lr = lr_at(cfg.optim.schedule, st["step"], cfg.optim.lr, cfg.optim.warmup_steps, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train(cfg.dropout)
            t0 = time.perf_counter()
            loss = task.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip)
            optimizer.step()
            if ema is not None:
                with torch.no_grad():
                    for e, p in zip(ema, unique):
                        e.lerp_(p, 1.0 - cfg.ema_decay)
            loss = loss.detach()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if st["step"] > 0:  # the first update pays one-off costs (allocations, kernel selection)
                st["step_seconds"] += time.perf_counter() - t0
                st["timed_steps"] += 1
            st["step"] += 1
            st["batch_in_epoch"] = i + 1
            if st["step"] % cfg.log_every == 0:
                log.log(st["step"], train_loss=loss.item(), lr=lr)
            if cfg.eval_every and st["step"] % cfg.eval_every == 0 and evaluate_and_save():
                stopped, done = "early_stopping", True
                break
            if cfg.max_steps is not None and st["step"] >= cfg.max_steps:
                stopped, done = "max_steps", True
                break
        else:
            st["epoch"] += 1
            st["batch_in_epoch"] = 0
            if not cfg.eval_every and evaluate_and_save():
                stopped, done = "early_stopping", True
    if st["evaluated_step"] != st["step"]:  # updates since the last evaluation (max_steps, a partial interval)
        evaluate_and_save()
    st["train_seconds"] += time.perf_counter() - start

    # -- final report with the best checkpoint --------------------------------------------------------------------
    method.load_exported_state_dict({k: v.to(device) for k, v in best_state["method"].items()})
    if head is not None:
        head.load_state_dict(best_state["head"])
    model.eval()
    summary: dict[str, Any] = {
        "method": cfg.method.name,
        "task": cfg.data.task.value,
        "seed": cfg.seed,
        "select_metric": select_key,
        "best_step": st["best_step"],
        "steps": st["step"],
        "epochs": st["epoch"],
        "stopped": stopped,
        "trainable_params": trainable,
        "mean_step_seconds": st["step_seconds"] / st["timed_steps"] if st["timed_steps"] else None,
        "train_seconds": round(st["train_seconds"], 3),
        **_peak_memory(device),
    }
    if dev_split is not None:
        metrics, preds = evaluate_split(task, dev_split, cfg.eval_batch_size, device)
        write_report(task, dev_split, metrics, preds, run_dir)
        summary["dev"] = metrics
    best_path = save_checkpoint(run_dir / "best", best_state["method"], best_state["head"],
                                {**meta, "training": {k: v for k, v in summary.items()}})
    summary["checkpoint"] = str(best_path)
    summary["checkpoint_bytes"] = best_path.stat().st_size
    write_json(run_dir / "metrics.json", summary)
    log.close()
    try:
        plot_learning_curves(_wide_log(run_dir), run_dir / "learning_curves.png", title=f"{cfg.method.name}")
    except Exception as e:  # a plot must never fail a finished run
        logger.warning("no learning-curve plot: %s", e)
    save_training_state(True, summary)
    return summary


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


def _check_resumable(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    changed = C.first_difference(saved, current, _RESUMABLE_CHANGES)
    if changed is not None:
        key, a, b = changed
        raise ConfigError(f"{path} was saved by a run with {key}={a!r}, but this config has {b!r}; use another "
                          "run_dir, or resume=false to start over")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config (keys below)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-3")
    parser.epilog = "config keys:\n" + C.describe(TrainConfig)


def run(args: argparse.Namespace) -> int:
    import json

    cfg = C.load_config(TrainConfig, args.config, args.overrides)
    summary = train(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "dev"} | {"dev": summary.get("dev")}))
    return 0
