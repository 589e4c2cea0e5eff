"""Libri-light's limited-resource training sets (10 min, 1 h, 10 h) for CTC fine-tuning, evaluated on LibriSpeech.

``librispeech_finetuning.tgz`` extracts to six 10-minute folds, ``1h/0`` ... ``1h/5`` (together the 1-hour set),
and ``9h`` (with the 1-hour set, the 10-hour set); each holds ``clean/`` and ``other/`` trees in LibriSpeech's own
layout (``<speaker>/<chapter>/<speaker>-<chapter>.trans.txt`` beside the ``.flac`` files). This is the training data
of wav2vec 2.0's and HuBERT's low-resource fine-tuning and of S3-Router's main experiments.

Splits written: ``train`` (the chosen set), ``dev`` (LibriSpeech dev-other by default, fairseq's ``valid_subset``
for these configs) and one split per test subset, ``test_clean`` and ``test_other``, from the LibriSpeech folder
(``librispeech=PATH``, by default ``ROOT/LibriSpeech`` or the ``LibriSpeech`` folder beside ROOT). Transcripts are
kept as written (upper case), as fairseq's letter targets are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from speechprompt.config import ConfigError, option
from speechprompt.data_prep.datasets.base import DatasetError, Item, Listing, register_dataset, require_dir
from speechprompt.data_prep.datasets.librispeech import LibriSpeechOptions, subset_items

NAME = "librilight"
FOLDS = 6  # 10-minute folds of the 1-hour set
SUBSETS = ("10min", "1h", "10h")

LAYOUT = """\
  ROOT/                       librispeech_finetuning as extracted
    1h/0/ ... 1h/5/           six 10-minute folds, each with clean/ and other/ in LibriSpeech's layout:
      clean/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt and <speaker>-<chapter>-<utterance>.flac
    9h/clean/, 9h/other/      the rest of the 10-hour set
  LibriSpeech/dev-clean, dev-other, test-clean, test-other   (inside or beside ROOT, or librispeech=PATH)"""


@dataclass
class LibriLightOptions:
    """Options of the Libri-light limited-resource preparer."""

    subset: Literal["10min", "1h", "10h"] = option("10h", help="training set: 10min (one fold of 1h/), 1h or 10h")
    fold: int = option(0, help="the 10-minute fold (0-5) that subset=10min uses")
    librispeech: str | None = option(None, help="the LibriSpeech folder with the dev/test subsets (null: "
                                     "ROOT/LibriSpeech, else the LibriSpeech folder beside ROOT)")
    dev: str = option("dev-other", help="the LibriSpeech subset of the dev split (fairseq validates on dev-other)")
    test: list[str] = option(["test-clean", "test-other"], help="LibriSpeech subsets, one test split each "
                             "(test-clean -> test_clean)")

    def __post_init__(self) -> None:
        if not 0 <= self.fold < FOLDS:
            raise ConfigError(f"fold must be 0-{FOLDS - 1}, got {self.fold}")
        if not self.test:
            raise ConfigError("test needs at least one LibriSpeech subset")


def training_dirs(root: Path, opts: LibriLightOptions) -> list[Path]:
    """The ``clean``/``other`` folders of the chosen training set, in order."""
    if opts.subset == "10min":
        parts = [root / "1h" / str(opts.fold)]
    else:
        parts = [root / "1h" / str(k) for k in range(FOLDS)] + ([root / "9h"] if opts.subset == "10h" else [])
    dirs = []
    for part in parts:
        require_dir(part, NAME, f"part of the {opts.subset} set")
        dirs += [require_dir(part / kind, NAME, f"the {kind} half of {part.name}") for kind in ("clean", "other")]
    return dirs


def _librispeech_root(root: Path, opts: LibriLightOptions) -> Path:
    if opts.librispeech is not None:
        return require_dir(Path(opts.librispeech), NAME, "the LibriSpeech folder given as librispeech")
    for candidate in (root / "LibriSpeech", root.parent / "LibriSpeech"):
        if candidate.is_dir():
            return candidate
    raise DatasetError(f"{NAME}: no LibriSpeech folder in or beside {root} for the dev/test subsets (give "
                       f"librispeech=PATH). Expected layout:\n{LAYOUT}")


@register_dataset(NAME, LibriLightOptions, LAYOUT, task="sequence")
def build(root: Path, out: Path, opts: LibriLightOptions) -> Listing:
    """Libri-light limited-resource ASR (10 min / 1 h / 10 h) with LibriSpeech dev-other and test-clean/other."""
    reader = LibriSpeechOptions()  # transcripts as written, .flac
    splits: dict[str, list[Item]] = {"train": []}
    untranscribed: list[str] = []
    for folder in training_dirs(root, opts):
        items, extra = subset_items(folder, reader)
        splits["train"] += items
        untranscribed += extra
    libri = _librispeech_root(root, opts)
    for split, subset in [("dev", opts.dev)] + [(t.replace("-", "_"), t) for t in opts.test]:
        items, extra = subset_items(require_dir(libri / subset, NAME, f"the LibriSpeech {subset} subset"), reader)
        splits[split] = items
        untranscribed += extra
    notes: dict = {"subset": opts.subset, "librispeech": str(libri)}
    if opts.subset == "10min":
        notes["fold"] = opts.fold
    if untranscribed:
        notes["untranscribed_audio"] = untranscribed
    return Listing(splits, notes)
