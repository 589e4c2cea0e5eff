"""Prompt methods against full fine-tuning on the embedded synthetic commands task: accuracy over seeds, and
training step time and peak memory relative to full fine-tuning, from the same comparison run.

Reads ``exp/synthetic_commands/results.json``, which ``make demo`` (``speechprompt compare``) writes. Without it,
runs ``speechprompt compare`` with small settings (2 seeds, 2 epochs, into ``exp/bench_prompt``) when the demo's
data and unit LM exist; without those either, prints an error object telling to run ``make demo`` first (exit 2).

Prints ONE JSON object:
  methods:  per method: accuracy mean ± std over seeds per split, seeds, trainable parameters, checkpoint bytes,
            mean training step seconds and peak RSS, and their ratios to full fine-tuning's
            (``step_time_vs_full_ft`` < 1 and ``peak_rss_vs_full_ft`` < 1 mean cheaper than full fine-tuning).

Peak RSS is the training process's peak resident memory, which includes the Python runtime and the data; on the
demo's small LM these fixed costs dominate, so memory ratios are close to 1 there and smaller on bigger models.

    python benchmarks/prompt.py
    python benchmarks/prompt.py --results path/to/results.json
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

DEMO_RESULTS = Path("exp/synthetic_commands/results.json")
DEMO_INPUTS = (Path("exp/synthetic_commands/ulm/checkpoint_best.pt"), Path("exp/synthetic_commands/units/train.units"))
SMALL_OUT = Path("exp/bench_prompt")
SMALL_SETTINGS = ["--seeds", "2", "--out", str(SMALL_OUT), "overrides=[max_epochs=2]"]
FULL_FT = "full_finetune"


def _fail(message: str) -> int:
    print(json.dumps({"benchmark": "prompt_vs_full_finetune", "error": message}))
    return 2


def _ratio(value: Any, reference: Any) -> float | None:
    if not isinstance(value, (int, float)) or not isinstance(reference, (int, float)):
        return None
    if not (math.isfinite(value) and math.isfinite(reference)) or reference <= 0:
        return None
    return round(value / reference, 4)


def _clean(x: Any) -> Any:
    """JSON without NaN (not valid JSON): non-finite floats become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def summarize(rows: list[dict[str, Any]], source: str) -> dict[str, Any]:
    """The benchmark's object from the rows of a ``results.json`` (see :mod:`speechprompt.compare`)."""
    reference = next((r for r in rows if r["method"] == FULL_FT), None)
    methods = {}
    for r in rows:
        splits = {
            name: {"mean": s.get("mean"), "std": s.get("std"), "n": len(s.get("values", []))}
            for name, s in (r.get("splits") or {}).items()
        }
        methods[r["method"]] = {
            "metric": r.get("metric"),
            "splits": splits,
            "seeds": r.get("seeds"),
            "trainable_params": r.get("trainable_params"),
            "trainable_percent": r.get("trainable_percent"),
            "checkpoint_bytes": r.get("checkpoint_bytes"),
            "mean_step_seconds": r.get("mean_step_seconds"),
            "peak_rss_bytes": r.get("peak_rss_bytes"),
            "step_time_vs_full_ft": None if reference is None else _ratio(
                r.get("mean_step_seconds"), reference.get("mean_step_seconds")),
            "peak_rss_vs_full_ft": None if reference is None else _ratio(
                r.get("peak_rss_bytes"), reference.get("peak_rss_bytes")),
            "params_vs_full_ft": None if reference is None else _ratio(
                r.get("trainable_params"), reference.get("trainable_params")),
        }
    out: dict[str, Any] = {
        "benchmark": "prompt_vs_full_finetune",
        "source": source,
        "reference": FULL_FT if reference is not None else None,
        "methods": methods,
    }
    if reference is None:
        out["note"] = f"no {FULL_FT} row in {source}: ratios are null"
    return _clean(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=None,
                        help=f"a compare results.json (default: {DEMO_RESULTS}, else a small compare run)")
    args = parser.parse_args(argv)

    path = args.results
    if path is None:
        if DEMO_RESULTS.is_file():
            path = DEMO_RESULTS
        elif (SMALL_OUT / "results.json").is_file():
            path = SMALL_OUT / "results.json"
        elif all(p.is_file() for p in DEMO_INPUTS):
            cmd = [sys.executable, "-m", "speechprompt.cli", "compare", "--task", "synthetic_commands",
                   *SMALL_SETTINGS]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
                return _fail(f"`{' '.join(cmd[1:])}` failed (exit {done.returncode}): {tail[0]}")
            path = SMALL_OUT / "results.json"
        else:
            return _fail(f"no {DEMO_RESULTS} and no demo data ({', '.join(map(str, DEMO_INPUTS))}): "
                         "run `make demo` first")
    if not path.is_file():
        return _fail(f"no results file {path}")
    try:
        rows = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return _fail(f"{path} is not a results JSON: {e}")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "method" in r for r in rows):
        return _fail(f"{path} is not a list of compare rows")
    print(json.dumps(summarize(rows, str(path)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
