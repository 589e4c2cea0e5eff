"""How much a unit inventory says about the words: a bag-of-units probe on a labelled corpus, one JSON object.

For each unit set (a folder of ``<split>.units`` files, one line per manifest row, as ``speechprompt prepare`` writes
them), a logistic regression on each utterance's unit histogram (the fraction of its frames per unit, and per unit
bigram of the deduplicated sequence) is trained on ``train`` and scored on the other splits. The first unit set is
the baseline (MFCC k-means units, say) that the others are compared with in the same run. Also reported: units per
second after merging repeats, and the perplexity of the unit distribution (how many units are really used).

    python benchmarks/units_probe.py --labels exp/data/commands mfcc=exp/u_mfcc hubert_it1=exp/u_it1

Used for docs/pretrain_hubert.md: units of the MFCC k-means, and of layers of HuBERTs pretrained on synthetic
sentences, probed on the synthetic commands (unseen voices in ``test``, an unseen synthesizer in ``test_synth``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

SPLITS = ("train", "dev", "test", "test_synth")


def read_units(path: Path) -> list[list[int]]:
    return [[int(u) for u in line.split()] for line in path.read_text().splitlines()]


def histogram(rows: list[list[int]], k: int) -> np.ndarray:
    """Unit fractions ``(N, k)`` and deduplicated-bigram fractions ``(N, k * k)`` side by side."""
    out = np.zeros((len(rows), k + k * k))
    for i, units in enumerate(rows):
        if not units:
            continue
        np.add.at(out[i], units, 1.0 / len(units))
        dedup = [u for j, u in enumerate(units) if j == 0 or u != units[j - 1]]
        if len(dedup) > 1:
            pairs = k + np.array(dedup[:-1]) * k + np.array(dedup[1:])
            np.add.at(out[i], pairs, 1.0 / (len(dedup) - 1))
    return out


def probe(units_dir: Path, labels_dir: Path, seconds: dict[str, float]) -> dict[str, float]:
    rows = {s: read_units(units_dir / f"{s}.units") for s in SPLITS if (units_dir / f"{s}.units").exists()}
    labels = {s: (labels_dir / f"{s}.labels").read_text().splitlines() for s in rows}
    k = 1 + max(u for split in rows.values() for units in split for u in units)
    x = {s: histogram(r, k) for s, r in rows.items()}
    clf = LogisticRegression(max_iter=3000, C=10.0).fit(x["train"], labels["train"])
    out: dict[str, float] = {f"{s}_accuracy": float(np.mean(clf.predict(x[s]) == np.array(labels[s])))
                             for s in rows if s != "train"}
    counts = np.bincount([u for units in rows["train"] for u in units], minlength=k).astype(float)
    p = counts[counts > 0] / counts.sum()
    out["unit_perplexity"] = float(math.exp(-(p * np.log(p)).sum()))
    dedup = sum(sum(1 for j, u in enumerate(units) if j == 0 or u != units[j - 1]) for units in rows["train"])
    out["dedup_units_per_second"] = dedup / seconds["train"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=Path, required=True, help="folder with <split>.labels and <split>.tsv")
    parser.add_argument("units", nargs="+", help="NAME=DIR unit folders; the first is the baseline")
    args = parser.parse_args()
    seconds = {}
    for split in SPLITS:
        tsv = args.labels / f"{split}.tsv"
        if tsv.exists():
            seconds[split] = sum(int(line.split("\t")[1]) for line in tsv.read_text().splitlines()[1:]) / 16000
    results = {}
    for item in args.units:
        name, folder = item.split("=", 1)
        results[name] = probe(Path(folder), args.labels, seconds)
    print(json.dumps({"baseline": args.units[0].split("=")[0], "results": results}))


if __name__ == "__main__":
    main()
