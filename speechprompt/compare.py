"""Compare tuning methods on one task over several seeds: train, evaluate every held-out split, tabulate.

    speechprompt compare --task synthetic_commands
    speechprompt compare --config recipes/synthetic_commands/conf/compare.yaml methods=[deep_prompt,lora] seeds=3

Each method is a training config (``<conf_dir>/<method>.yaml``, the same file ``speechprompt train`` takes). Every
(method, seed) run goes to ``<out>/<method>/seed<S>``; a finished run is not trained again, and an interrupted one
resumes, so a killed comparison is simply started again. The best checkpoint of each run (selected on dev) is then
scored on every evaluation split. ``<out>`` receives:

    results.json    one row per method: the CLI contract's fields (method, accuracy_mean, accuracy_std, seeds,
                    trainable_params, checkpoint_bytes, checkpoint) plus per-split statistics, memory and speed
    results.md/.csv the same as a table
    metric_vs_params.png   the primary split's metric against trainable parameters (log scale)

``accuracy_*`` is the task metric on the primary split (by default the first evaluation split), as the mean and
the sample standard deviation (ddof=1) over seeds. ``checkpoint`` is the run whose *dev* metric was best, never
chosen on test.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
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
from speechprompt.models.unit_lm import load_unit_lm
from speechprompt.plots import plot_metric_vs_params
from speechprompt.tasks.data import load_split
from speechprompt.tasks.evaluation import evaluate_split, write_report
from speechprompt.tasks.loading import load_task
from speechprompt.train import TrainConfig, train

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SplitFiles:
    """An evaluation split: a units file and its line-aligned labels."""

    units: str = option(help="units file")
    labels: str = option(help="labels file")


@dataclasses.dataclass
class CompareConfig:
    """Which methods to run, on which data, and where the results go."""

    conf_dir: str = option(help="directory holding one training config per method (<method>.yaml)")
    methods: list[str] = option(help="config names in conf_dir, in the order of the table")
    seeds: int = option(3, help="seeds 1..N per method")
    out: str = option("exp/compare", help="output directory (runs go to <out>/<method>/seed<S>)")
    eval: dict[str, SplitFiles] = option({}, help="evaluation splits by name; the primary one first")
    primary: str | None = option(None, help="split reported as accuracy_mean/std (null: the first eval split)")
    metric: str | None = option(None, help="metric key to report, e.g. greedy.accuracy (null: each task's default)")
    overrides: list[str] = option([], help="key=value overrides applied to every training config")
    jobs: int = option(1, help="runs trained at once (each run is its own process; 2 suits a 2-core CPU)")
    threads: int = option(0, help="torch CPU threads per run (0: torch's default; 1 is often fastest on a small CPU)")

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.jobs < 1 or self.threads < 0:
            raise ConfigError("seeds and jobs must be >= 1, threads >= 0")
        if not self.methods:
            raise ConfigError("methods must name at least one config")
        for m in self.methods:
            if not (Path(self.conf_dir) / f"{m}.yaml").is_file():
                raise ConfigError(f"method {m!r}: no config {Path(self.conf_dir) / (m + '.yaml')}")
        if self.primary is not None and self.primary not in self.eval:
            raise ConfigError(f"primary split {self.primary!r} is not among eval: {sorted(self.eval)}")

    @property
    def primary_split(self) -> str | None:
        return self.primary or next(iter(self.eval), None)


def _run_one(cfg: CompareConfig, method: str, seed: int, threads: int) -> dict[str, Any]:
    """Train (or resume, or skip when finished) one run, then score its best checkpoint on every split."""
    run_dir = Path(cfg.out) / method / f"seed{seed}"
    logger.info("%s seed %d -> %s", method, seed, run_dir)
    overrides = [*cfg.overrides, f"seed={seed}", f"run_dir={run_dir}"]
    train_cfg = C.load_config(TrainConfig, Path(cfg.conf_dir) / f"{method}.yaml", overrides)
    with torch_threads(threads):
        summary = train(train_cfg)
        task, ckpt, dictionary = load_task(summary["checkpoint"], device=train_cfg.device)
        device = resolve_device(train_cfg.device)
        splits = {}
        for name, files in cfg.eval.items():
            split = load_split(files.units, files.labels, len(dictionary) - dictionary.nspecial,
                               train_cfg.data.max_len, name=name)
            metrics, preds = evaluate_split(task, split, train_cfg.eval_batch_size, device)
            write_report(task, split, metrics, preds, run_dir, {"checkpoint": str(ckpt.path)})
            splits[name] = metrics
    return {"method": method, "seed": seed, "summary": summary, "splits": splits,
            "default_metric": task.default_metric}


def _init_worker(level: int) -> None:
    """Spawned workers start with no logging set up; show their progress lines like the parent's."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def aggregate(cfg: CompareConfig, runs: list[dict[str, Any]], base_params: int | None) -> list[dict[str, Any]]:
    """One row per method (see the module docstring)."""
    rows = []
    root = Path.cwd()
    for method in cfg.methods:
        mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"])
        metric = cfg.metric or mine[0]["default_metric"]
        splits = {name: _stats([r["splits"][name].get(metric, math.nan) for r in mine]) for name in cfg.eval}
        dev_values = [(r["summary"].get("dev") or {}).get(metric, -math.inf) for r in mine]
        best = mine[max(range(len(mine)), key=lambda i: dev_values[i])]
        checkpoint = Path(best["summary"]["checkpoint"]).resolve()
        with contextlib.suppress(ValueError):
            checkpoint = checkpoint.relative_to(root)
        first = mine[0]["summary"]
        primary = splits.get(cfg.primary_split or "", {"mean": math.nan, "std": math.nan})
        trainable = first["trainable_params"]
        rows.append({
            "method": method,
            "metric": metric,
            "accuracy_mean": primary["mean"],
            "accuracy_std": primary["std"],
            "seeds": [r["seed"] for r in mine],
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


def format_table(rows: list[dict[str, Any]], split_names: list[str]) -> str:
    """A Markdown table: metric mean ± std per split, trainable parameters and %, checkpoint size, memory, speed."""
    head = ["method", *[f"{s} (mean ± std)" for s in split_names], "trainable", "%", "ckpt", "peak RSS", "s/step"]
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
    jobs = [(m, s) for m in cfg.methods for s in range(1, cfg.seeds + 1)]
    runs: list[dict[str, Any]] = []
    # Every run gets a fresh process: its peak RSS is then its own (a reused worker would report the largest run
    # so far), and on a small CPU two one-thread runs beat one run on every core. Results do not depend on the
    # schedule: each run is seeded on its own.
    ctx = multiprocessing.get_context("spawn")
    level = logging.getLogger().getEffectiveLevel()
    with cf.ProcessPoolExecutor(
        cfg.jobs, mp_context=ctx, max_tasks_per_child=1, initializer=_init_worker, initargs=(level,)
    ) as pool:
        futures = {pool.submit(_run_one, cfg, m, s, cfg.threads): (m, s) for m, s in jobs}
        for fut in cf.as_completed(futures):
            m, s = futures[fut]
            runs.append(fut.result())
            logger.info("finished %s seed %d", m, s)
    rows = aggregate(cfg, runs, _base_params(runs))
    split_names = list(cfg.eval)
    write_json(out / "results.json", rows)
    table = format_table(rows, split_names)
    write_text(out / "results.md", table)
    csv_lines = ["method,metric,split,mean,std,trainable_params,checkpoint_bytes"]
    csv_lines += [
        f"{r['method']},{r['metric']},{s},{r['splits'][s]['mean']:.6f},{r['splits'][s]['std']:.6f},"
        f"{r['trainable_params']},{r['checkpoint_bytes']}"
        for r in rows for s in split_names
    ]
    write_text(out / "results.csv", "\n".join(csv_lines) + "\n")
    if cfg.primary_split:
        plot_rows = [{**r, "accuracy": r["accuracy_mean"], "accuracy_std": r["accuracy_std"]} for r in rows]
        try:
            plot_metric_vs_params(plot_rows, out / "metric_vs_params.png", metric="accuracy")
        except Exception as e:  # a plot must never lose the results
            logger.warning("no metric-vs-params plot: %s", e)
    return rows


def _base_params(runs: list[dict[str, Any]]) -> int | None:
    """Parameter count of the frozen base LM (for the trainable %), from the first run's checkpoint."""
    for r in runs:
        meta = read_sidecar(r["summary"]["checkpoint"])
        n = (meta.get("base") or {}).get("parameters")
        if n:
            return int(n)
        path = (meta.get("base") or {}).get("path")
        if path and os.path.isfile(path):
            model, _ = load_unit_lm(path)
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
    print(format_table(rows, list(cfg.eval)), end="")
    print(f"results: {Path(cfg.out) / 'results.json'}")
    return 0

