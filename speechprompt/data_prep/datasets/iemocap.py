"""IEMOCAP emotion recognition (SUPERB ER): four classes, five folds, leave one session out.

Each session's ``dialog/EmoEvaluation/<dialog>.txt`` holds one line per utterance that starts with ``[``::

    [6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[2.5000, 2.5000, 2.5000]

the utterance id and its consensus category; the audio is ``sentences/wav/<dialog>/<utterance id>.wav``. As SUPERB
(s3prl's ``IEMOCAP_preprocess.py``), only ``neu``, ``hap``, ``ang``, ``sad`` and ``exc`` are kept, excitement is
merged into happiness, and the other categories (``fru``, ``sur``, ``xxx`` ...) are left out (counted in
``summary.json``).

Fold ``k`` tests on session ``k`` and trains on the other four, of which a random ``dev_ratio`` (20%) becomes the dev
split, drawn from ``seed`` (s3prl draws it with ``torch.manual_seed(0)`` over its own file order, so the dev
utterances are not the same ones; the proportion is). SUPERB reports the mean accuracy of the five folds: prepare
each (``fold=1`` ... ``fold=5``) into its own folder, as ``recipes/iemocap_superb`` does.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speechprompt.config import ConfigError, option
from speechprompt.data_prep.datasets.base import DatasetError, Item, Listing, register_dataset, require_dir

NAME = "iemocap"
SESSIONS = 5
KEPT = ("neu", "hap", "ang", "sad", "exc")
MERGE = {"exc": "hap"}  # SUPERB's four classes: excitement counts as happiness
LINE = re.compile(r"^\[[^\]]*\]\t(\S+)\t(\S+)\t")

LAYOUT = """\
  ROOT/                       IEMOCAP_full_release as extracted
    Session1/ ... Session5/
      dialog/EmoEvaluation/<dialog>.txt   '[start - end]<TAB><utterance id><TAB><category><TAB>[V, A, D]' lines
      sentences/wav/<dialog>/<utterance id>.wav"""


@dataclass
class IemocapOptions:
    """Options of the IEMOCAP preparer (defaults: SUPERB ER)."""

    fold: int = option(1, help="the test session (1-5); the other four train, minus the dev share")
    dev_ratio: float = option(0.2, help="share of the training sessions' utterances drawn into dev (s3prl: 0.2)")
    seed: int = option(0, help="seed of the dev draw")
    merge_excited: bool = option(True, help="count 'exc' as 'hap' (SUPERB's 4 classes); false leaves 'exc' out")

    def __post_init__(self) -> None:
        if not 1 <= self.fold <= SESSIONS:
            raise ConfigError(f"fold must be 1-{SESSIONS} (the test session), got {self.fold}")
        if not 0 < self.dev_ratio < 1:
            raise ConfigError(f"dev_ratio must be in (0, 1), got {self.dev_ratio}")


def read_evaluation(path: Path) -> list[tuple[str, str]]:
    """``(utterance id, category)`` of every utterance line of one EmoEvaluation file."""
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.startswith("["):
            continue
        match = LINE.match(line)
        if match is None:
            raise DatasetError(f"{NAME}: {path}:{n}: expected '[start - end]<TAB>utterance<TAB>category<TAB>...', "
                               f"got {line.strip()!r}")
        out.append((match.group(1), match.group(2)))
    return out


def session_items(session_dir: Path, opts: IemocapOptions, dropped: Counter) -> list[Item]:
    """The kept utterances of one session, in file and line order; ``dropped`` counts the categories left out."""
    labels_dir = require_dir(session_dir / "dialog" / "EmoEvaluation", NAME, "the emotion labels")
    wav_dir = require_dir(session_dir / "sentences" / "wav", NAME, "the utterance audio")
    files = sorted(labels_dir.glob("*.txt"))
    if not files:
        raise DatasetError(f"{NAME}: no <dialog>.txt in {labels_dir}. Expected layout:\n{LAYOUT}")
    items = []
    for path in files:
        for utt, category in read_evaluation(path):
            label = MERGE.get(category, category) if opts.merge_excited else category
            if category not in KEPT or (category == "exc" and not opts.merge_excited):
                dropped[category] += 1
                continue
            dialog = utt.rsplit("_", 1)[0]
            items.append(Item(wav_dir / dialog / f"{utt}.wav", label))
    return items


@register_dataset(NAME, IemocapOptions, LAYOUT, task="classification")
def build(root: Path, out: Path, opts: IemocapOptions) -> Listing:
    """IEMOCAP 4-class emotion recognition, leave-one-session-out fold (SUPERB ER): test on session `fold`."""
    dropped: Counter = Counter()
    per_session = {s: session_items(require_dir(root / f"Session{s}", NAME, f"session {s}"), opts, dropped)
                   for s in range(1, SESSIONS + 1)}
    test = per_session[opts.fold]
    pool = [item for s, items in per_session.items() if s != opts.fold for item in items]
    order = np.random.default_rng(opts.seed).permutation(len(pool))
    n_train = int((1 - opts.dev_ratio) * len(pool))  # s3prl's rounding
    train = [pool[i] for i in sorted(order[:n_train])]
    dev = [pool[i] for i in sorted(order[n_train:])]
    notes = {"fold": opts.fold, "test_session": f"Session{opts.fold}",
             "left_out_categories": dict(sorted(dropped.items()))}
    return Listing({"train": train, "dev": dev, "test": test}, notes)
