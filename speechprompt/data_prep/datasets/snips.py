"""Audio SNIPS for slot filling, in the format of SUPERB SF (s3prl ``downstream/ctc``, ``snips.yaml``).

The corpus is the synthesized (Amazon Polly) SNIPS that s3prl's preprocessing builds: ``all.iob.snips.txt`` holds
one line per utterance, ``<Speaker>-snips-<split>-<n> BOS w1 ... wN EOS<TAB>O t1 ... tN <intent>``, where ``ti`` is
the slot of word ``i`` (``O`` for none; bare slot names such as ``playlist``, or ``B-``/``I-`` prefixed IOB tags),
and ``<split>/<Speaker>-snips-<split>-<n>.wav`` the audio. SUPERB splits by speaker: 8 training voices, 4 dev and 4
test voices (the defaults below).

The label is the transcript with every slot value wrapped in its tags, exactly what SUPERB's slot-filling metrics
read (:func:`speechprompt.tasks.metrics.parse_slots`)::

    add B-artist sting E-artist to B-playlist my workout E-playlist

as s3prl's character-slot encoder writes it: punctuation words (``? ! . , ; -``) are dropped, ``&`` becomes
``AND``, and consecutive words with the same bare tag form one span. Train with ``data.task=sequence`` and
``verbalizer.tag_pattern='[BE]-\\S+'`` so that each tag stays one token.
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
    require_file,
)

logger = logging.getLogger(__name__)

NAME = "snips"
TRANSCRIPTS = "all.iob.snips.txt"
PUNCTUATION = frozenset({"?", "!", ".", ",", ";", "-", ""})
OUTSIDE = "O"
# SUPERB SF's speakers (s3prl downstream/ctc/snips.yaml).
TRAIN_SPEAKERS = ["Ivy", "Joanna", "Joey", "Justin", "Kendra", "Kimberly", "Matthew", "Salli"]
DEV_SPEAKERS = ["Aditi", "Amy", "Geraint", "Nicole"]
TEST_SPEAKERS = ["Brian", "Emma", "Raveena", "Russell"]
SPLIT_DIRS = {"train": "train", "dev": "valid", "test": "test"}

LAYOUT = f"""\
  ROOT/                       the SNIPS folder of s3prl's SNIPS preprocessing
    {TRANSCRIPTS}         '<Speaker>-snips-<split>-<n> BOS w1 .. wN EOS<TAB>O t1 .. tN <intent>' per line
    train/ valid/ test/       <Speaker>-snips-<split>-<n>.wav"""


@dataclass
class SnipsOptions:
    """Options of the Audio SNIPS preparer (defaults: SUPERB SF's speaker split)."""

    train_speakers: list[str] = option(TRAIN_SPEAKERS, help="voices of the train split (audio under train/)")
    dev_speakers: list[str] = option(DEV_SPEAKERS, help="voices of the dev split (audio under valid/)")
    test_speakers: list[str] = option(TEST_SPEAKERS, help="voices of the test split (audio under test/)")
    lowercase: bool = option(False, help="lower-case the words (slot tags keep their case)")
    audio_ext: str = option(".wav", help="audio file suffix")

    def __post_init__(self) -> None:
        groups = [set(self.train_speakers), set(self.dev_speakers), set(self.test_speakers)]
        if not all(groups):
            raise ConfigError("every split needs at least one speaker")
        if any(a & b for i, a in enumerate(groups) for b in groups[i + 1:]):
            raise ConfigError("a speaker may be in only one split")


def tag_slots(words: list[str], tags: list[str], lowercase: bool = False) -> str:
    """Words with their slot values wrapped in ``B-<slot>`` ... ``E-<slot>`` (SUPERB SF's target text).

    Args:
        words: the words, without ``BOS``/``EOS``.
        tags: one tag per word: ``O``, a bare slot name, or ``B-<slot>``/``I-<slot>``.
        lowercase: lower-case the words.

    Returns:
        One space-separated line, e.g. ``"play B-artist lil wayne E-artist"``.
    """
    if len(words) != len(tags):
        raise ValueError(f"{len(words)} words but {len(tags)} tags")
    pairs = [("AND" if w == "&" else w, t) for w, t in zip(words, tags) if w not in PUNCTUATION]

    def slot(tag: str) -> str | None:
        return None if tag == OUTSIDE else tag[2:] if tag[:2] in ("B-", "I-") else tag

    def starts(i: int) -> bool:  # does word i open a new span?
        tag = pairs[i][1]
        return tag.startswith("B-") or i == 0 or slot(pairs[i - 1][1]) != slot(tag)

    out: list[str] = []
    for i, (word, tag) in enumerate(pairs):
        name = slot(tag)
        if name is not None and starts(i):
            out.append(f"B-{name}")
        out.append(word.lower() if lowercase else word)
        if name is not None and (i + 1 == len(pairs) or slot(pairs[i + 1][1]) != name or starts(i + 1)):
            out.append(f"E-{name}")
    return " ".join(out)


def read_transcripts(path: Path, lowercase: bool = False) -> dict[str, str]:
    """``{utterance id: tagged text}`` of ``all.iob.snips.txt``; a malformed line is an error naming it."""
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        text, sep, tag_text = line.strip().partition("\t")
        words, tags = text.split(" "), tag_text.split()
        if not sep or len(words) < 3 or words[1] != "BOS" or words[-1] != "EOS":
            raise DatasetError(f"{NAME}: {path}:{n}: expected '<id> BOS words EOS<TAB>O tags <intent>', got "
                               f"{line[:80]!r}")
        try:
            out[words[0]] = tag_slots(words[2:-1], tags[1:-1], lowercase)
        except ValueError as e:
            raise DatasetError(f"{NAME}: {path}:{n}: {e}") from None
    return out


@register_dataset(NAME, SnipsOptions, LAYOUT, task="sequence")
def build(root: Path, out: Path, opts: SnipsOptions) -> Listing:
    """Audio SNIPS slot filling (SUPERB SF): transcripts with B-/E- slot tags, split by speaker."""
    transcripts = read_transcripts(require_file(root / TRANSCRIPTS, NAME, "transcripts with slot tags"),
                                   opts.lowercase)
    speakers = {"train": opts.train_speakers, "dev": opts.dev_speakers, "test": opts.test_speakers}
    splits: dict[str, list[Item]] = {}
    unlabelled: list[str] = []
    for split, folder in SPLIT_DIRS.items():
        audio = sorted(require_dir(root / folder, NAME, f"the {split} audio").rglob(f"*{opts.audio_ext}"))
        wanted = set(speakers[split])
        splits[split] = []
        for path in audio:
            if path.stem not in transcripts:
                unlabelled.append(str(path))
                continue
            if path.stem.split("-")[0] in wanted:
                splits[split].append(Item(path, transcripts[path.stem]))
        if not splits[split]:
            raise DatasetError(f"{NAME}: no {opts.audio_ext} files of the speakers {sorted(wanted)} under "
                               f"{root / folder}")
    for path in unlabelled:
        logger.warning("%s: no line in %s; left out", path, TRANSCRIPTS)
    return Listing(splits, {"audio_without_transcript": unlabelled} if unlabelled else {})
