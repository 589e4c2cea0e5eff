"""Synthesize a speech corpus with espeak-ng, flite and festival, split by voice and by synthesizer.

Writes ``DIR/{train,dev,test,test_synth}.tsv`` (fairseq manifests), ``.labels`` (one label per line) and
``.meta.jsonl`` (one JSON object per utterance: engine, voice, rate, pitch, text, augmentation, seed), 16 kHz
mono 16-bit WAVs under ``DIR/wav/<split>/``, and ``DIR/corpus.json`` (voices, counts and durations per split, the
seed, the engine versions and the command that rebuilds it). The output is a pure function of the options:
the same seed gives byte-identical files, however many workers run.

The splits are made over speakers, never utterances:

  train       speakers of the seen engines, with rate, pitch and (for a fraction) augmentation varied
  dev         other speakers of the seen engines (about 15%)
  test        other speakers again (about 15%): what carries over to a voice never heard
  test_synth  every voice of the held-out engine (--heldout-synth): what carries over to an engine never heard

Which speakers go where does not depend on --seed, so runs with different seeds are scored on the same voices.
Tasks: ``commands`` (the 12 Speech Commands v1 classes, 1 s clips), ``intent`` (Fluent Speech Commands'
action|object|location intents), ``digits`` (3-7 spoken digits, the words as target) and ``sentences``
(random-word sentences for unit-LM pretraining).

Examples::

    speechprompt synth --task commands --out data/synth_commands --per-class 60
    speechprompt synth --task sentences --out data/synth_sentences augment.fraction=0
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import shlex
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from speechprompt.config import apply_overrides, describe, from_dict, to_dict
from speechprompt.data_prep.manifest import (
    Manifest,
    ManifestEntry,
    validate_manifest,
    write_labels,
    write_manifest_file,
)
from speechprompt.data_prep.synth_plan import SAMPLE_RATE, SPLITS, SynthConfig, plan_split, split_voices
from speechprompt.data_prep.synth_render import batched, init_worker, make_babble_sources, render_batch
from speechprompt.data_prep.synth_tasks import TASKS
from speechprompt.data_prep.voices import SYNTHESIZERS, get_synthesizer
from speechprompt.errors import SpeechPromptError
from speechprompt.fileio import atomic_open, read_json, write_json
from speechprompt.progress import Progress

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------- corpus


def _config_key(cfg: SynthConfig) -> dict[str, Any]:
    """The fields that determine the output (``workers`` and ``out`` do not)."""
    data = to_dict(cfg)
    data.pop("workers")
    data.pop("out")
    return data


def command_line(cfg: SynthConfig) -> str:
    """The command that rebuilds this corpus: the flags, plus ``key=value`` for every other non-default field."""
    per_class, eval_per_class = cfg.resolved_per_class()
    args = ["speechprompt", "synth", "--task", cfg.task, "--out", cfg.out, "--seed", str(cfg.seed),
            "--per-class", str(per_class), "--eval-per-class", str(eval_per_class),
            "--heldout-synth", cfg.heldout_synth, "--synths", *cfg.synths]  # fmt: skip
    flagged = {"task", "out", "seed", "per_class", "eval_per_class", "heldout_synth", "synths", "workers"}
    defaults = _flatten(to_dict(SynthConfig(task=cfg.task, out=cfg.out)))
    for key, value in _flatten(to_dict(cfg)).items():
        if key.split(".")[0] not in flagged and defaults.get(key) != value:
            args.append(f"{key}={json.dumps(value)}")
    return shlex.join(args)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _duration_summary(seconds: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(seconds, dtype=np.float64)
    return {"total_s": round(float(arr.sum()), 3), "mean_s": round(float(arr.mean()), 3),
            "min_s": round(float(arr.min()), 3), "max_s": round(float(arr.max()), 3)}  # fmt: skip


def build_corpus(cfg: SynthConfig, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Synthesize the corpus described by ``cfg`` into ``cfg.out``. Returns the ``corpus.json`` summary.

    A corpus already built from the same options is left as it is. One built from other options is an error,
    unless ``overwrite`` (which deletes its ``wav/`` folder first).
    """
    out = Path(cfg.out)
    summary_path = out / "corpus.json"
    if summary_path.exists():
        previous = read_json(summary_path)
        if previous.get("config_key") == _config_key(cfg):
            logger.info("%s is up to date (same options); nothing to do", out)
            return previous
        if not overwrite:
            raise SpeechPromptError(f"{out} holds a corpus built with other options; pass --overwrite to replace it")
        shutil.rmtree(out / "wav", ignore_errors=True)
        summary_path.unlink()
    task = cfg.task_obj
    start = time.perf_counter()
    pools, notes = split_voices(cfg)
    for note in notes:
        logger.warning("%s", note)
    plans = {split: plan_split(cfg, split, pools[split]) for split in SPLITS}
    babble_sources = make_babble_sources(cfg, pools["train"])

    wav_root = (out / "wav").resolve()
    all_utts = [u for split in SPLITS for u in plans[split]]
    results: dict[str, dict[str, Any]] = {}
    batches = list(batched(all_utts))
    with Progress(len(all_utts), f"synth {cfg.task}", unit="utt", enabled=progress) as bar:
        if cfg.workers == 1:
            init_worker(babble_sources)
            outputs: Iterator[list[dict[str, Any]]] = (
                render_batch(b, str(wav_root), task.clip_seconds) for b in batches
            )
            for batch, res in zip(batches, outputs):
                results.update({u.uid: r for u, r in zip(batch, res)})
                bar.update(len(batch))
        else:
            # spawn, not fork: the parent may hold threads (torch, a progress bar) that a forked child would inherit
            # locked.
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=init_worker,
                                     initargs=(babble_sources,)) as pool:  # fmt: skip
                futures = [pool.submit(render_batch, b, str(wav_root), task.clip_seconds) for b in batches]
                for batch, future in zip(batches, futures):
                    results.update({u.uid: r for u, r in zip(batch, future.result())})
                    bar.update(len(batch))
    elapsed = time.perf_counter() - start

    summary_splits = {}
    for split in SPLITS:
        plan = plans[split]
        entries = [ManifestEntry(u.relpath, results[u.uid]["num_samples"]) for u in plan]
        write_manifest_file(out / f"{split}.tsv", Manifest(wav_root, entries))
        write_labels(out / f"{split}.labels", [u.label for u in plan])
        with atomic_open(out / f"{split}.meta.jsonl", "w", encoding="utf-8") as f:
            for u in plan:
                meta = u.meta()
                meta["num_samples"] = results[u.uid]["num_samples"]
                meta.update(results[u.uid]["facts"])
                f.write(json.dumps(meta, sort_keys=False) + "\n")
        seconds = [results[u.uid]["num_samples"] / SAMPLE_RATE for u in plan]
        used = Counter(u.voice.synth for u in plan if u.voice)
        summary_splits[split] = {
            "utterances": len(plan),
            "duration": _duration_summary(seconds),
            "labels": dict(sorted(Counter(u.label for u in plan).items())) if cfg.task != "sentences" else None,
            "utterances_per_synth": dict(sorted(used.items())),
            "augmented": sum(1 for u in plan if u.augment),
            "speakers": {
                name: sorted({v.speaker for v in pools[split] if v.synth == name})
                for name in sorted({v.synth for v in pools[split]})
            },
            "voices": [v.id for v in pools[split]],
        }
    total_s = sum(s["duration"]["total_s"] for s in summary_splits.values())
    logger.info(
        "synthesized %d utterances (%.1f min of audio) in %.1f s with %d workers: %.1f utt/s, %.0fx real time",
        len(all_utts), total_s / 60, elapsed, cfg.workers, len(all_utts) / elapsed, total_s / elapsed,
    )
    summary = {
        "task": cfg.task,
        "seed": cfg.seed,
        "sample_rate": SAMPLE_RATE,
        "classes": task.classes() if cfg.task != "sentences" else None,
        "heldout_synth": cfg.heldout_synth,
        "command": command_line(cfg),
        "synth_versions": {name: get_synthesizer(name).version() for name in cfg.synths},
        "splits": summary_splits,
        "notes": notes,
        "config_key": _config_key(cfg),
    }
    write_json(summary_path, summary)  # written last: its presence marks a complete corpus
    return summary


def validate_corpus(out: str | Path) -> list[str]:
    """Check every split's manifest, audio and labels and its metadata line count. Returns the problems found."""
    out = Path(out)
    problems = []
    for split in SPLITS:
        tsv = out / f"{split}.tsv"
        problems += validate_manifest(tsv, out / f"{split}.labels")
        n_rows = max(0, len(tsv.read_text(encoding="utf-8").splitlines()) - 1) if tsv.exists() else 0
        meta = out / f"{split}.meta.jsonl"
        n_meta = len(meta.read_text(encoding="utf-8").splitlines()) if meta.exists() else 0
        if n_meta != n_rows:
            problems.append(f"{meta}: {n_meta} lines for {n_rows} manifest rows")
    if not (out / "corpus.json").exists():
        problems.append(f"{out}/corpus.json is missing: the corpus is incomplete")
    return problems


# ------------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, choices=list(TASKS), help="what to synthesize")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    parser.add_argument("--per-class", type=int, default=None,
                        help="training utterances per class (default: the task's own: "
                             + ", ".join(f"{n} {t.default_per_class}" for n, t in TASKS.items()) + ")")  # fmt: skip
    parser.add_argument("--eval-per-class", type=int, default=None,
                        help="dev/test/test_synth utterances per class (default: the task's own)")  # fmt: skip
    parser.add_argument("--synths", nargs="+", default=list(SYNTHESIZERS), choices=list(SYNTHESIZERS),
                        help="engines to use")  # fmt: skip
    parser.add_argument("--heldout-synth", default="festival", choices=list(SYNTHESIZERS),
                        help="engine heard only in the test_synth split")  # fmt: skip
    parser.add_argument("--workers", type=int, default=2, help="synthesis processes")
    parser.add_argument("--overwrite", action="store_true", help="replace a corpus built with other options")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="any other option of the config below, e.g. augment.fraction=0.5")  # fmt: skip
    parser.epilog = "config keys:\n" + describe(SynthConfig)


def config_from_args(args: argparse.Namespace) -> SynthConfig:
    """The :class:`SynthConfig` of parsed command-line arguments (flags first, then ``key=value`` overrides)."""
    data: dict[str, Any] = {
        "task": args.task, "out": args.out, "seed": args.seed, "per_class": args.per_class,
        "eval_per_class": args.eval_per_class, "synths": args.synths, "heldout_synth": args.heldout_synth,
        "workers": args.workers,
    }  # fmt: skip
    return from_dict(SynthConfig, apply_overrides(data, args.overrides))


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    build_corpus(cfg, overwrite=args.overwrite, progress=not args.no_progress)
    problems = validate_corpus(cfg.out)
    if problems:
        raise SpeechPromptError(f"the corpus in {cfg.out} failed validation: {problems[0]}")
    print(Path(cfg.out) / "corpus.json")
    return 0


if __name__ == "__main__":
    import sys

    from speechprompt.cli import main

    sys.exit(main(["synth", *sys.argv[1:]]))


