"""How much a unit inventory says about the words: a bag-of-units probe on a labelled corpus, one JSON object.

For each unit set (a folder of ``<split>.units`` files, one line per manifest row, as ``speechprompt prepare``
writes them), a logistic regression on each utterance's unit histogram (the fraction of its frames per unit, and per
unit bigram of the deduplicated sequence) is trained on ``train`` and scored on the other splits. The first unit set
is the baseline (MFCC k-means units, say) that the others are compared with in the same run. Also reported: units per
second after merging repeats, and the perplexity of the unit distribution (how many units are really used).

    python benchmarks/units_probe.py --labels exp/data/commands mfcc=exp/u_mfcc hubert_it1=exp/u_it1

The probe itself is ``speechprompt.data_prep.units_probe`` (``speechprompt units-probe``, which the demo's recipe
uses to choose its units on dev); this script keeps the benchmark's command line. Used for docs/pretrain_hubert.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from speechprompt.data_prep.units_probe import manifest_seconds, probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=Path, required=True, help="folder with <split>.labels and <split>.tsv")
    parser.add_argument("units", nargs="+", help="NAME=DIR unit folders; the first is the baseline")
    args = parser.parse_args()
    seconds = manifest_seconds(args.labels / "train.tsv")
    results = {}
    for item in args.units:
        name, folder = item.split("=", 1)
        results[name] = probe(Path(folder), args.labels, seconds)
    print(json.dumps({"baseline": args.units[0].split("=")[0], "results": results}))


if __name__ == "__main__":
    main()
