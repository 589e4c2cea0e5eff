"""Compare tuning methods on one task over several seeds: train, evaluate every held-out split, tabulate.

    speechprompt compare --task synthetic_commands
    speechprompt compare --config recipes/synthetic_commands/conf/compare.yaml methods=[deep_prompt,lora] seeds=3
    speechprompt compare --config recipes/iemocap_superb/conf/compare.yaml        # encoder methods, 5 folds

Each method is a training config (``<conf_dir>/<method>.yaml``, the same file its trainer takes): ``trainer: train``
(the default) runs methods on the frozen unit LM (``speechprompt train``; evaluation splits are units files),
``trainer: superb`` runs methods inside an encoder with a SUPERB head (``speechprompt superb``; evaluation splits are
audio manifests). Every (method, seed) run goes to ``<out>/<method>/seed<S>``; a finished run is not trained again,
and an interrupted one resumes, so a killed comparison is simply started again. The best checkpoint of each run
(selected on dev) is then scored on every evaluation split. ``<out>`` receives:

    results.json    one row per method: the CLI contract's fields (method, accuracy_mean, accuracy_std, seeds,
                    trainable_params, checkpoint_bytes, checkpoint) plus per-split statistics, memory and speed
    results.md/.csv the same as a table
    metric_vs_params.png   the primary split's metric against trainable parameters (log scale)

``accuracy_*`` is the task metric on the primary split (by default the first evaluation split), as the mean and
the sample standard deviation (ddof=1) over seeds; a SUPERB row names it after its metric (``accuracy_mean`` for a
classification head, ``wer_mean`` for a CTC head). ``checkpoint`` is the run whose *dev* metric was best, never
chosen on test.

With ``folds`` (cross-validation: IEMOCAP's five sessions, ESC-50's five folds), every (method, fold, seed) runs in
``<out>/<method>/<fold>/seed<S>``, ``{fold}`` in ``overrides`` and in the evaluation paths becomes the fold's name,
and the reported mean and std are over the folds (each fold's value the mean over its seeds), as SUPERB reports ER.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import enum
import logging
import math
import multiprocessing
import os
import statistics
from pathlib import Path
from typing import Any

from speechprompt import config as C
from speechprompt.checkpoint import read_sidecar
from speechprompt.config import ConfigError, option
from speechprompt.devices import resolve_device, torch_threads
from speechprompt.errors import SpeechPromptError
from speechprompt.fileio import write_json, write_text
from speechprompt.lock import DirectoryLock
from speechprompt.models.hf_decoders import load_speech_lm
from speechprompt.plots import plot_metric_vs_params
from speechprompt.superb import (
    SuperbConfig,
    evaluate_superb,
    load_audio_split,
    load_superb,
    train_superb,
    write_superb_report,
)
from speechprompt.tasks.data import load_split
from speechprompt.tasks.evaluation import evaluate_split, write_report
from speechprompt.tasks.loading import load_task
from speechprompt.train import TrainConfig, train

logger = logging.getLogger(__name__)


class Trainer(str, enum.Enum):
    """What the methods' configs train, and so what an evaluation split is."""

    TRAIN = "train"  # speechprompt train: methods on the frozen unit LM; splits are units files
    SUPERB = "superb"  # speechprompt superb: methods inside an encoder with a SUPERB head; splits are audio


@dataclasses.dataclass
class SplitFiles:
    """An evaluation split: a units file (``trainer: train``) or an audio manifest (``trainer: superb``), and its
    line-aligned labels."""

    units: str | None = option(None, help="units file (trainer: train)")
    labels: str | None = option(None, help="labels file (trainer: superb: default the manifest's .labels sidecar)")
    manifest: str | None = option(None, help="audio manifest, fairseq TSV (trainer: superb)")

    def __post_init__(self) -> None:
        if (self.units is None) == (self.manifest is None):
            raise ConfigError("an evaluation split needs units (trainer: train) or manifest (trainer: superb), "
                              f"not {'both' if self.units else 'neither'}")


@dataclasses.dataclass
class CompareConfig:
    """Which methods to run, on which data, and where the results go."""

    conf_dir: str = option(help="directory holding one training config per method (<method>.yaml)")
    methods: list[str] = option(help="config names in conf_dir, in the order of the table")
    trainer: Trainer = option(Trainer.TRAIN, help="train (methods on the unit LM; eval splits are units) or superb "
                              "(methods inside an encoder; eval splits are audio manifests)")
    seeds: int = option(3, help="seeds 1..N per method")
    out: str = option("exp/compare", help="output directory (runs go to <out>/<method>/seed<S>)")
    eval: dict[str, SplitFiles] = option({}, help="evaluation splits by name; the primary one first")
    primary: str | None = option(None, help="split reported as accuracy_mean/std (null: the first eval split)")
    metric: str | None = option(None, help="metric key to report, e.g. greedy.accuracy (null: each task's default)")
    overrides: list[str] = option([], help="key=value overrides applied to every training config")
    jobs: int = option(1, help="runs trained at once (each run is its own process; 2 suits a 2-core CPU)")
    threads: int = option(0, help="torch CPU threads per run (0: torch's default; 1 is often fastest on a small CPU)")
    folds: list[str] = option([], help="cross-validation folds: each method and seed runs once per fold, with {fold} "
                              "in overrides and eval paths replaced by the fold's name; mean and std are over folds")

    def __post_init__(self) -> None:
        try:
            self.trainer = Trainer(self.trainer)
        except ValueError:
            raise ConfigError(f"trainer {self.trainer!r} is not one of {[t.value for t in Trainer]}") from None
        if self.seeds < 1 or self.jobs < 1 or self.threads < 0:
            raise ConfigError("seeds and jobs must be >= 1, threads >= 0")
        if not self.methods:
            raise ConfigError("methods must name at least one config")
        for m in self.methods:
            if not (Path(self.conf_dir) / f"{m}.yaml").is_file():
                raise ConfigError(f"method {m!r}: no config {Path(self.conf_dir) / (m + '.yaml')}")
        if self.primary is not None and self.primary not in self.eval:
            raise ConfigError(f"primary split {self.primary!r} is not among eval: {sorted(self.eval)}")
        for name, files in self.eval.items():
            if self.trainer is Trainer.TRAIN and (files.units is None or files.labels is None):
                raise ConfigError(f"eval split {name!r}: trainer train evaluates units; give units and labels")
            if self.trainer is Trainer.SUPERB and files.manifest is None:
                raise ConfigError(f"eval split {name!r}: trainer superb evaluates audio; give manifest (and labels)")
        if len(set(self.folds)) != len(self.folds) or any(not f or "/" in f for f in self.folds):
            raise ConfigError(f"folds must be distinct names without '/', got {self.folds}")

    @property
    def primary_split(self) -> str | None:
        return self.primary or next(iter(self.eval), None)


def _run_one(cfg: CompareConfig, method: str, fold: str | None, seed: int, threads: int) -> dict[str, Any]:
    """Train (or resume, or skip when finished) one run, then score its best checkpoint on every split."""
    run_dir = Path(cfg.out) / method / (f"{fold}/seed{seed}" if fold else f"seed{seed}")
    logger.info("%s%s seed %d -> %s", method, f" {fold}" if fold else "", seed, run_dir)
    overrides = [_in_fold(o, fold) for o in cfg.overrides] + [f"seed={seed}", f"run_dir={run_dir}"]
    splits = {name: SplitFiles(*(_in_fold(p, fold) if p else p for p in (f.units, f.labels, f.manifest)))
              for name, f in cfg.eval.items()}
    with torch_threads(threads):
        record = TRAINERS[cfg.trainer](Path(cfg.conf_dir) / f"{method}.yaml", overrides, splits, run_dir)
    return {"method": method, "fold": fold, "seed": seed, **record}


def _in_fold(text: str, fold: str | None) -> str:
    """``text`` with ``{fold}`` replaced by the fold's name (unchanged without folds)."""
    return text.replace("{fold}", fold) if fold is not None else text


def _run_unit_lm(conf: Path, overrides: list[str], splits: dict[str, SplitFiles], run_dir: Path) -> dict[str, Any]:
    """``speechprompt train`` and the task's metrics on units files."""
    train_cfg = C.load_config(TrainConfig, conf, overrides)
    summary = train(train_cfg)
    task, ckpt, vocab = load_task(summary["checkpoint"], device=train_cfg.device)
    device = resolve_device(train_cfg.device)
    results = {}
    for name, files in splits.items():
        split = load_split(files.units, files.labels, vocab, train_cfg.data.max_len, name=name)
        metrics, preds = evaluate_split(task, split, train_cfg.eval_batch_size, device)
        write_report(task, split, metrics, preds, run_dir, {"checkpoint": str(ckpt.path)})
        results[name] = metrics
    return {"summary": summary, "splits": results, "default_metric": task.default_metric, "higher_is_better": True}


def _run_superb(conf: Path, overrides: list[str], splits: dict[str, SplitFiles], run_dir: Path) -> dict[str, Any]:
    """``speechprompt superb`` and the head's metrics on audio manifests."""
    train_cfg = C.load_config(SuperbConfig, conf, overrides)
    summary = train_superb(train_cfg)
    model = load_superb(summary["checkpoint"], device=resolve_device(train_cfg.device))
    results = {}
    for name, files in splits.items():
        split = load_audio_split(files.manifest, files.labels)
        metrics, hyps = evaluate_superb(model, split, train_cfg.eval_batch_size)
        write_superb_report(model, split, name, metrics, hyps, run_dir, {"checkpoint": summary["checkpoint"]})
        results[name] = metrics
    # The unit-LM trainer's names for what the table shows.
    summary = {**summary, "trainable_params": summary["trainable_parameters"]}
    return {"summary": summary, "splits": results, "default_metric": model.head.default_metric,
            "higher_is_better": model.head.higher_is_better}


TRAINERS = {Trainer.TRAIN: _run_unit_lm, Trainer.SUPERB: _run_superb}


def _init_worker(level: int) -> None:
    """Spawned workers start with no logging set up; show their progress lines like the parent's."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def _over_folds(values: dict[str | None, list[float]]) -> dict[str, Any]:
    """Statistics over seeds, or, with folds, over the folds' means (each fold's own statistics kept)."""
    if list(values) == [None]:
        return _stats(values[None])
    per_fold = {fold: _stats(v) for fold, v in values.items()}
    return {**_stats([s["mean"] for s in per_fold.values()]), "folds": per_fold}


def aggregate(cfg: CompareConfig, runs: list[dict[str, Any]], base_params: int | None) -> list[dict[str, Any]]:
    """One row per method (see the module docstring)."""
    rows = []
    root = Path.cwd()
    folds: list[str | None] = list(cfg.folds) or [None]
    for method in cfg.methods:
        mine = sorted((r for r in runs if r["method"] == method), key=lambda r: (folds.index(r.get("fold")), r["seed"]))
        metric = cfg.metric or mine[0]["default_metric"]
        higher = mine[0].get("higher_is_better", True)
        splits = {name: _over_folds({f: [r["splits"][name].get(metric, math.nan) for r in mine if r.get("fold") == f]
                                     for f in folds}) for name in cfg.eval}
        worst = -math.inf if higher else math.inf
        dev_values = [(r["summary"].get("dev") or {}).get(metric, worst) for r in mine]
        pick = max if higher else min
        best = mine[pick(range(len(mine)), key=lambda i: dev_values[i])]
        checkpoint = Path(best["summary"]["checkpoint"]).resolve()
        with contextlib.suppress(ValueError):
            checkpoint = checkpoint.relative_to(root)
        first = mine[0]["summary"]
        primary = splits.get(cfg.primary_split or "", {"mean": math.nan, "std": math.nan})
        trainable = first["trainable_params"]
        # The CLI contract calls the primary metric accuracy_*; a SUPERB row says which metric it is (wer_*).
        key = "accuracy" if cfg.trainer is Trainer.TRAIN else metric
        rows.append({
            "method": method,
            "metric": metric,
            f"{key}_mean": primary["mean"],
            f"{key}_std": primary["std"],
            "seeds": sorted({r["seed"] for r in mine}),
            **({"folds": list(cfg.folds)} if cfg.folds else {}),
            "trainable_params": trainable,
            "trainable_percent": 100.0 * trainable / base_params if base_params else None,
            "checkpoint_bytes": first["checkpoint_bytes"],
            "checkpoint": str(checkpoint),
            "splits": splits,
            "dev": _stats([v for v in dev_values if math.isfinite(v)]) if any(map(math.isfinite, dev_values))
            else None,
            "peak_rss_bytes": max(r["summary"].get("peak_rss_bytes") or 0 for r in mine) or None,
            "mean_step_seconds": statistics.fmean(
                [r["summary"]["mean_step_seconds"] for r in mine if r["summary"].get("mean_step_seconds")] or [math.nan]
            ),
        })
    return rows


def _mean_std(stats: dict[str, Any]) -> str:
    """``mean ± std``; one seed has no spread to show (its std is recorded as 0), so the cell says so instead."""
    if len(stats["values"]) < 2:
        return f"{stats['mean']:.3f} (1 seed)"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def format_table(rows: list[dict[str, Any]], split_names: list[str], metric: str | None = None) -> str:
    """A Markdown table: metric mean ± std per split, trainable parameters and %, checkpoint size, memory, speed.

    ``metric`` names the metric in the column headers (the unit-LM table leaves it out).
    """
    what = f" {metric}" if metric else ""
    head = ["method", *[f"{s}{what} (mean ± std)" for s in split_names], "trainable", "%", "ckpt", "peak RSS",
            "s/step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"]]
        cells += [_mean_std(r["splits"][s]) for s in split_names]
        pct = r["trainable_percent"]
        cells += [
            f"{r['trainable_params']:,}",
            f"{pct:.3g}" if pct is not None else "?",
            _bytes(r["checkpoint_bytes"]),
            _bytes(r["peak_rss_bytes"]) if r["peak_rss_bytes"] else "?",
            f"{r['mean_step_seconds']:.3f}" if math.isfinite(r["mean_step_seconds"]) else "?",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def compare(cfg: CompareConfig) -> list[dict[str, Any]]:
    """Run every (method, seed), then write results.json/.md/.csv and the PNG. Returns the rows."""
    out = Path(cfg.out)
    with DirectoryLock(out, command="speechprompt compare"):
        return _compare(cfg, out)


def _compare(cfg: CompareConfig, out: Path) -> list[dict[str, Any]]:
    C.save_config(cfg, out / "compare.yaml")
    jobs = [(m, f, s) for m in cfg.methods for f in (cfg.folds or [None]) for s in range(1, cfg.seeds + 1)]
    runs: list[dict[str, Any]] = []
    # Every run gets a fresh process: its peak RSS is then its own (a reused worker would report the largest run
    # so far), and on a small CPU two one-thread runs beat one run on every core. Results do not depend on the
    # schedule: each run is seeded on its own.
    ctx = multiprocessing.get_context("spawn")
    level = logging.getLogger().getEffectiveLevel()
    with cf.ProcessPoolExecutor(
        cfg.jobs, mp_context=ctx, max_tasks_per_child=1, initializer=_init_worker, initargs=(level,)
    ) as pool:
        futures = {pool.submit(_run_one, cfg, m, f, s, cfg.threads): (m, f, s) for m, f, s in jobs}
        for fut in cf.as_completed(futures):
            m, f, s = futures[fut]
            runs.append(fut.result())
            logger.info("finished %s%s seed %d", m, f" {f}" if f else "", s)
    rows = aggregate(cfg, runs, _base_params(runs, cfg.trainer))
    split_names = list(cfg.eval)
    write_json(out / "results.json", rows)
    table = format_table(rows, split_names, _metric_label(cfg, rows))
    write_text(out / "results.md", table)
    csv_lines = ["method,metric,split,mean,std,trainable_params,checkpoint_bytes"]
    csv_lines += [
        f"{r['method']},{r['metric']},{s},{r['splits'][s]['mean']:.6f},{r['splits'][s]['std']:.6f},"
        f"{r['trainable_params']},{r['checkpoint_bytes']}"
        for r in rows for s in split_names
    ]
    write_text(out / "results.csv", "\n".join(csv_lines) + "\n")
    if cfg.primary_split:
        if cfg.trainer is Trainer.TRAIN:
            plot_rows = [{**r, "accuracy": r["accuracy_mean"], "accuracy_std": r["accuracy_std"]} for r in rows]
            metric = "accuracy"
        else:  # each row holds <metric>_mean/_std already
            plot_rows, metric = rows, rows[0]["metric"]
        try:
            plot_metric_vs_params(plot_rows, out / "metric_vs_params.png", metric=metric)
        except Exception as e:  # a plot must never lose the results
            logger.warning("no metric-vs-params plot: %s", e)
    return rows


def _metric_label(cfg: CompareConfig, rows: list[dict[str, Any]]) -> str | None:
    """The metric named in the table's headers: a SUPERB table's (accuracy, wer); the unit-LM table names none."""
    if cfg.trainer is Trainer.TRAIN or not rows:
        return None
    return rows[0]["metric"]


def _base_params(runs: list[dict[str, Any]], trainer: Trainer = Trainer.TRAIN) -> int | None:
    """Parameter count of the frozen base model (for the trainable %), from the first run's checkpoint: the unit LM,
    or the SUPERB upstream as stored (its sidecar records it)."""
    for r in runs:
        meta = read_sidecar(r["summary"]["checkpoint"])
        n = (meta.get("base") or {}).get("parameters")
        if n:
            return int(n)
        path = (meta.get("base") or {}).get("path")
        if trainer is Trainer.TRAIN and path and os.path.exists(path):
            model, _ = load_speech_lm(path)
            return sum(p.numel() for p in model.parameters())
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default=None,
                        help="a recipe name: shorthand for --config recipes/<task>/conf/compare.yaml")
    parser.add_argument("--config", default=None, help="compare YAML (keys below)")
    parser.add_argument("--methods", default=None, help="comma-separated config names (overrides the YAML)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (overrides the YAML)")
    parser.add_argument("--out", default=None, help="output directory (overrides the YAML)")
    parser.add_argument("--jobs", type=int, default=None, help="runs at once (overrides the YAML)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="compare config overrides")
    parser.epilog = "config keys:\n" + C.describe(CompareConfig)


def run(args: argparse.Namespace) -> int:
    if args.task and args.config:
        raise SpeechPromptError("give --task or --config, not both")
    path = args.config or (f"recipes/{args.task}/conf/compare.yaml" if args.task else None)
    if path is None:
        raise SpeechPromptError("give --task NAME or --config FILE")
    if not Path(path).is_file():
        raise SpeechPromptError(f"no compare config {path}" + (" (run from the repository root)" if args.task else ""))
    overrides = list(args.overrides)
    if args.methods:
        overrides.append(f"methods=[{args.methods}]")
    for key in ("seeds", "out", "jobs"):
        if getattr(args, key) is not None:
            overrides.append(f"{key}={getattr(args, key)}")
    cfg = C.load_config(CompareConfig, path, overrides)
    rows = compare(cfg)
    print(format_table(rows, list(cfg.eval), _metric_label(cfg, rows)), end="")
    print(f"results: {Path(cfg.out) / 'results.json'}")
    return 0

