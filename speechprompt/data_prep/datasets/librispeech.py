"""LibriSpeech for ASR: train-clean-100, dev-clean and test-clean by default, transcripts from ``*.trans.txt``.

Every chapter folder holds ``<speaker>-<chapter>.trans.txt``, one ``<utterance id> <TRANSCRIPT>`` per line, beside
the ``<utterance id>.flac`` files. The label is the transcript as written (upper case, no punctuation but
apostrophes) unless ``lowercase=true``. A transcript line without its audio is reported and left out; so is audio
without a transcript line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from speechprompt.config import ConfigError, option
from speechprompt.data_prep.datasets.base import (
    DatasetError,
    Item,
    Listing,
    register_dataset,
    require_dir,
)

logger = logging.getLogger(__name__)

NAME = "librispeech"

LAYOUT = """\
  ROOT/                       the LibriSpeech folder the archives extract into (or the folder holding it)
    train-clean-100/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt
    train-clean-100/<speaker>/<chapter>/<speaker>-<chapter>-<utterance>.flac
    dev-clean/...   test-clean/...   (the same layout; other subsets by option)"""


@dataclass
class LibriSpeechOptions:
    """Options of the LibriSpeech preparer: which subsets make each split."""

    train: list[str] = option(["train-clean-100"], help="subsets joined into the train split")
    dev: list[str] = option(["dev-clean"], help="subsets joined into the dev split")
    test: list[str] = option(["test-clean"], help="subsets joined into the test split (e.g. [test-clean, "
                             "test-other])")
    lowercase: bool = option(False, help="lower-case the transcripts")
    audio_ext: str = option(".flac", help="audio file suffix")

    def __post_init__(self) -> None:
        for split in ("train", "dev", "test"):
            if not getattr(self, split):
                raise ConfigError(f"{split} needs at least one LibriSpeech subset")
        if not self.audio_ext.startswith("."):
            raise ConfigError(f"audio_ext must start with a dot, got {self.audio_ext!r}")


def read_transcripts(trans_file: Path) -> dict[str, str]:
    """``{utterance id: transcript}`` of one ``*.trans.txt``. A line without text is an error naming the line."""
    out = {}
    for n, line in enumerate(trans_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        utt, _, text = line.strip().partition(" ")
        if not text.strip():
            raise DatasetError(f"{NAME}: {trans_file}:{n}: no transcript after the utterance id {utt!r}")
        out[utt] = " ".join(text.split())
    return out


def subset_items(subset_dir: Path, opts: LibriSpeechOptions) -> tuple[list[Item], list[str]]:
    """The utterances of one subset, sorted by id, and the audio files that have no transcript line."""
    items, untranscribed = [], []
    trans_files = sorted(subset_dir.glob("*/*/*.trans.txt"))
    if not trans_files:
        raise DatasetError(f"{NAME}: no <speaker>/<chapter>/*.trans.txt under {subset_dir}. Expected layout:\n"
                           f"{LAYOUT}")
    for trans in trans_files:
        texts = read_transcripts(trans)
        for utt, text in sorted(texts.items()):
            items.append(Item(trans.parent / f"{utt}{opts.audio_ext}", text.lower() if opts.lowercase else text))
        untranscribed += [str(p) for p in sorted(trans.parent.glob(f"*{opts.audio_ext}")) if p.stem not in texts]
    return items, untranscribed


@register_dataset(NAME, LibriSpeechOptions, LAYOUT, task="sequence")
def build(root: Path, out: Path, opts: LibriSpeechOptions) -> Listing:
    """LibriSpeech ASR (train-clean-100 / dev-clean / test-clean by default), transcripts as labels."""
    base = root / "LibriSpeech" if (root / "LibriSpeech").is_dir() and not (root / opts.train[0]).is_dir() else root
    splits: dict[str, list[Item]] = {}
    untranscribed: list[str] = []
    for split in ("train", "dev", "test"):
        splits[split] = []
        for subset in getattr(opts, split):
            items, extra = subset_items(require_dir(base / subset, NAME, f"the {subset} subset ({split})"), opts)
            splits[split] += items
            untranscribed += extra
    for path in untranscribed:
        logger.warning("%s: no transcript line; left out", path)
    return Listing(splits, {"untranscribed_audio": untranscribed} if untranscribed else {})
