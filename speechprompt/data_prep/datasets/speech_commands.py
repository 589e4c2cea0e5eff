"""Google Speech Commands in the 12-class keyword-spotting setup of SUPERB and SpeechPrompt (v1), or with every word
its own class (``all_words=true silence=false``: v2's 35 classes, the setting of AST and AAT).

Classes: the ten words ``yes no up down left right on off stop go``, ``_unknown_`` (every other word) and
``_silence_`` (1 s clips cut from ``_background_noise_``). Train and dev follow the official
``validation_list.txt``/``testing_list.txt`` (the same speaker-hash rule that ships with the dataset; it is
recomputed when the lists are missing). The test split is SUPERB's ``speech_commands_test_set_v0.01`` when it is
found or given (already 12 folders, silence included), else the official testing list.

Silence clips are written to ``OUT/_silence_/<noise file>_<start sample>.wav``. Each noise file is cut into
consecutive clips and its clips are dealt out as contiguous blocks (train first, then dev, then test), so that
no stretch of noise is heard in two splits.

Differences from SpeechPrompt's preparation: it resampled the training manifest class-balanced, with replacement
(a ``WeightedRandomSampler`` pass), and took one random 1 s crop per noise file per draw. Here every utterance is
listed once and the class counts are left as they are (see ``summary.json``); a smaller ``silence_stride`` gives
more (overlapping) silence clips.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from speechprompt.config import ConfigError, option
from speechprompt.data_prep.datasets.base import (
    DatasetError,
    Item,
    Listing,
    register_dataset,
    require_dir,
)
from speechprompt.fileio import atomic_open

logger = logging.getLogger(__name__)

NAME = "speech_commands"
WORDS: tuple[str, ...] = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
UNKNOWN = "_unknown_"
SILENCE = "_silence_"
NOISE_DIR = "_background_noise_"
TEST_SET_NAME = "speech_commands_test_set_v0.01"
TRAIN_SET_NAME = "speech_commands_v0.01"
# The dataset's own split rule (its README): a file's set is a hash of the speaker part of its name.
MAX_NUM_WAVS_PER_CLASS = 2**27 - 1
VALIDATION_PERCENT = 10.0
TESTING_PERCENT = 10.0

LAYOUT = f"""\
  ROOT/                         {TRAIN_SET_NAME} as extracted (or a folder holding it)
    yes/ no/ ... (30 word folders)/*.wav
    {NOISE_DIR}/*.wav   long noise recordings: the _silence_ class
    validation_list.txt, testing_list.txt   the official splits (recomputed from the file names if absent)
  {TEST_SET_NAME}/    optional, SUPERB's test set (beside or inside ROOT, or test_set=PATH):
    yes/ ... go/ _unknown_/ _silence_/*.wav"""


@dataclass
class SpeechCommandsOptions:
    """Options of the Speech Commands v1 preparer."""

    test_set: str = option(
        "auto",
        help=f"test split: 'auto' (SUPERB's {TEST_SET_NAME} if it is inside or beside ROOT, else the official "
        "testing list), 'official' (testing_list.txt, with silence clips of its own) or a path to the SUPERB "
        "test set",
    )
    words: list[str] = option(list(WORDS), help="the command words; every other word is _unknown_")
    silence_seconds: float = option(1.0, help="length of each _silence_ clip cut from the background noise")
    silence_stride: float = option(1.0, help="seconds between the starts of consecutive silence clips (less "
                                   "than silence_seconds makes them overlap, and more of them)")
    silence_dev_fraction: float = option(0.1, help="fraction of each noise file's clips that go to dev")
    silence_test_fraction: float = option(0.1, help="fraction that go to test (only when test is the official "
                                          "list; SUPERB's test set has its own silence)")
    all_words: bool = option(False, help="every word folder is its own class and there is no _unknown_ (Speech "
                             "Commands v2's 35 classes, the setting of AST and AAT); 'words' is then ignored")
    silence: bool = option(True, help="cut _silence_ clips from _background_noise_ (false: no _silence_ class, as "
                           "AST/AAT's 35-class setting)")

    def __post_init__(self) -> None:
        if not self.words or len(set(self.words)) != len(self.words):
            raise ConfigError(f"words must be distinct and non-empty, got {self.words}")
        if self.silence_seconds <= 0 or self.silence_stride <= 0:
            raise ConfigError("silence_seconds and silence_stride must be positive")
        fractions = (self.silence_dev_fraction, self.silence_test_fraction)
        if not all(0 <= f < 1 for f in fractions) or sum(fractions) >= 1:
            raise ConfigError("silence_dev_fraction and silence_test_fraction must be in [0, 1) and sum below 1")


def hash_split(relpath: str) -> str:
    """The split (train, dev or test) the dataset's own rule gives a file, from the speaker part of its name."""
    speaker = re.sub(r"_nohash_.*$", "", Path(relpath).name)
    digest = int(hashlib.sha1(speaker.encode("utf-8")).hexdigest(), 16)
    percent = (digest % (MAX_NUM_WAVS_PER_CLASS + 1)) * (100.0 / MAX_NUM_WAVS_PER_CLASS)
    if percent < VALIDATION_PERCENT:
        return "dev"
    if percent < VALIDATION_PERCENT + TESTING_PERCENT:
        return "test"
    return "train"


def class_of(word: str, words: list[str] | None) -> str:
    """The 12-class label of a word folder (``words=None``: every word is its own class)."""
    if word == SILENCE or words is None:
        return word
    return word if word in words else UNKNOWN


def _read_list(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}


def _find_train_root(root: Path) -> Path:
    """ROOT itself, or ROOT/speech_commands_v0.01 when ROOT is the folder both archives were extracted into."""
    if (root / NOISE_DIR).is_dir() or not (root / TRAIN_SET_NAME).is_dir():
        return root
    return root / TRAIN_SET_NAME


def _find_test_set(root: Path, train_root: Path, choice: str) -> Path | None:
    if choice == "official":
        return None
    if choice != "auto":
        return require_dir(Path(choice), NAME, "SUPERB's test set, given as test_set")
    for candidate in (root / TEST_SET_NAME, train_root / TEST_SET_NAME, train_root.parent / TEST_SET_NAME):
        if candidate.is_dir():
            return candidate
    return None


def _cut_silence(noise_dir: Path, out: Path, opts: SpeechCommandsOptions, with_test: bool
                 ) -> tuple[dict[str, list[Item]], list[str]]:
    """Cut every noise file into clips, write them under ``out/_silence_`` and deal them out to the splits."""
    clips: dict[str, list[Item]] = {"train": [], "dev": [], "test": []}
    problems: list[str] = []
    clip_dir = out / SILENCE
    test_fraction = opts.silence_test_fraction if with_test else 0.0
    for noise in sorted(noise_dir.glob("*.wav")):
        try:
            wav, sr = sf.read(str(noise), dtype="float32", always_2d=True)  # (T, C)
        except (sf.LibsndfileError, RuntimeError, OSError) as e:
            problems.append(f"{noise}: unreadable ({e})")
            continue
        wav = wav.mean(axis=1)  # (T,)
        length, stride = round(opts.silence_seconds * sr), round(opts.silence_stride * sr)
        starts = list(range(0, len(wav) - length + 1, stride))
        if not starts or not np.isfinite(wav).all():
            problems.append(f"{noise}: shorter than one {opts.silence_seconds:g} s clip or not finite")
            continue
        n_dev, n_test = round(len(starts) * opts.silence_dev_fraction), round(len(starts) * test_fraction)
        n_train = len(starts) - n_dev - n_test
        for i, start in enumerate(starts):
            split = "train" if i < n_train else "dev" if i < n_train + n_dev else "test"
            path = clip_dir / f"{noise.stem}_{start:08d}.wav"
            with atomic_open(path, "wb") as f:
                sf.write(f, wav[start:start + length], sr, format="WAV", subtype="PCM_16")
            clips[split].append(Item(path, SILENCE))
    return clips, problems


@register_dataset(NAME, SpeechCommandsOptions, LAYOUT, task="classification")
def build(root: Path, out: Path, opts: SpeechCommandsOptions) -> Listing:
    """Google Speech Commands v1, 12 classes (10 words, _unknown_, _silence_), as in SUPERB KS and SpeechPrompt."""
    train_root = _find_train_root(root)
    noise_dir = require_dir(train_root / NOISE_DIR, NAME, "background noise for the _silence_ class") \
        if opts.silence else None
    word_dirs = sorted(d for d in train_root.iterdir() if d.is_dir() and not d.name.startswith((".", "_")))
    word_dirs = [d for d in word_dirs if d.name != TEST_SET_NAME]
    words = None if opts.all_words else opts.words
    missing = [w for w in (words or []) if not (train_root / w).is_dir()]
    if missing:
        require_dir(train_root / missing[0], NAME, f"the word folder of {missing[0]!r}")
    if not word_dirs:
        raise DatasetError(f"{NAME}: no word folders in {train_root}. Expected layout:\n{LAYOUT}")
    lists = {"dev": train_root / "validation_list.txt", "test": train_root / "testing_list.txt"}
    if all(p.is_file() for p in lists.values()):
        listed = {split: _read_list(p) for split, p in lists.items()}
        rule = "official lists"

        def split_of(relpath: str) -> str:
            return next((s for s, names in listed.items() if relpath in names), "train")
    else:
        logger.warning("%s: no validation_list.txt/testing_list.txt; recomputing them from the file names", root)
        rule, split_of = "speaker hash (lists absent)", hash_split

    test_set = _find_test_set(root, train_root, opts.test_set)
    splits: dict[str, list[Item]] = {"train": [], "dev": [], "test": []}
    for d in word_dirs:
        label = class_of(d.name, words)
        for wav in sorted(d.glob("*.wav")):
            split = split_of(f"{d.name}/{wav.name}")
            if split == "test" and test_set is not None:
                continue  # SUPERB tests on its own set; the official test files are not used
            splits[split].append(Item(wav, label))
    clips, problems = _cut_silence(noise_dir, out, opts, with_test=test_set is None) if noise_dir is not None \
        else ({"train": [], "dev": [], "test": []}, [])
    for split, items in clips.items():
        splits[split].extend(items)
    if test_set is not None:
        class_dirs = sorted(d for d in test_set.iterdir() if d.is_dir())
        if not class_dirs:
            raise DatasetError(f"{NAME}: {test_set} has no class folders. Expected layout:\n{LAYOUT}")
        splits["test"] = [Item(wav, class_of(d.name, words))
                          for d in class_dirs for wav in sorted(d.glob("*.wav"))]
    notes = {"split_rule": rule, "test_set": str(test_set) if test_set else "official testing list",
             "silence_clips": {s: len(c) for s, c in clips.items()}}
    if problems:
        notes["unusable_noise_files"] = problems
    return Listing(splits, notes)
