"""The plan of a synthetic corpus: its config, the speaker splits, and every utterance's voice, text, rate, pitch,
augmentation and seed, drawn deterministically from ``--seed`` before anything is rendered."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from speechprompt.config import ConfigError, option
from speechprompt.data_prep.augment import (
    AugmentConfig,
    sample_augmentation,
)
from speechprompt.data_prep.synth_tasks import TASKS, Task
from speechprompt.data_prep.voices import SYNTHESIZERS, Request, Voice, get_synthesizer
from speechprompt.errors import SpeechPromptError

logger = logging.getLogger(__name__)


SAMPLE_RATE = 16000
SPLITS: tuple[str, ...] = ("train", "dev", "test", "test_synth")
_SPLIT_CODE = {name: i for i, name in enumerate(SPLITS)}  # part of every random stream's key



# ---------------------------------------------------------------------------------------------------------- config


@dataclass
class SynthConfig:
    """A synthetic corpus. Everything in it is a function of these fields (``workers`` aside)."""

    task: str = option(help=f"what to synthesize: one of {', '.join(TASKS)}")
    out: str = option(help="output directory")
    seed: int = option(0, help="seed of every random choice (texts, voices, rates, pitches, augmentation)")
    per_class: int | None = option(None, help="training utterances per class (None: the task's default)")
    eval_per_class: int | None = option(None, help="dev, test and test_synth utterances per class (None: default)")
    synths: list[str] = option(list(SYNTHESIZERS), help="engines to use (one of them is held out)")
    heldout_synth: str = option("festival", help="engine heard only in test_synth")
    dev_fraction: float = option(0.15, help="fraction of each seen engine's speakers held out for dev")
    test_fraction: float = option(0.15, help="fraction of each seen engine's speakers held out for test")
    rate_range: list[float] = option([0.8, 1.25], help="speaking-rate multiplier range, drawn per utterance")
    pitch_range: list[float] = option([0.85, 1.2], help="mean-f0 multiplier range, drawn per utterance")
    intonation_range: list[float] = option(
        [0.5, 1.8], help="f0-range multiplier range (a speaking style from flat to lively), drawn per utterance; "
        "flite and festival's diphone voices only")
    gain_db_range: list[float] = option([-20.0, -1.0], help="peak level range in dBFS, drawn per utterance")
    noise_floor_db_range: list[float] = option(
        [-80.0, -60.0], help="recording noise floor (RMS dBFS) under every clip, drawn per utterance"
    )
    silence_db_range: list[float] = option([-60.0, -25.0], help="RMS level range (dBFS) of _silence_ clips")
    babble_sources: int = option(24, help="training-voice utterances that babble is made of")
    workers: int = option(2, help="synthesis processes (the output does not depend on it)")
    augment: AugmentConfig = option(default_factory=AugmentConfig, help="augmentation of the training split")

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; known: {', '.join(TASKS)}")
        unknown = [s for s in self.synths if s not in SYNTHESIZERS]
        if unknown:
            raise ConfigError(f"unknown synthesizer {unknown[0]!r}; known: {', '.join(SYNTHESIZERS)}")
        if self.heldout_synth not in self.synths:
            raise ConfigError(f"heldout_synth {self.heldout_synth!r} is not among synths {self.synths}")
        if len(set(self.synths)) < 2:
            raise ConfigError("synths needs at least two engines: one to train on and one held out")
        for name in ("per_class", "eval_per_class"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if not (0 <= self.dev_fraction < 0.5 and 0 <= self.test_fraction < 0.5):
            raise ConfigError("dev_fraction and test_fraction must lie in [0, 0.5)")
        for name in ("rate_range", "pitch_range", "intonation_range", "gain_db_range", "noise_floor_db_range",
                     "silence_db_range"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1]:
                raise ConfigError(f"{name} must be [low, high] with low <= high, got {lo_hi}")
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, got {self.workers}")

    @property
    def task_obj(self) -> Task:
        return TASKS[self.task]()

    def resolved_per_class(self) -> tuple[int, int]:
        """``(per_class, eval_per_class)`` with the task's defaults filled in."""
        task = TASKS[self.task]
        return (self.per_class or task.default_per_class, self.eval_per_class or task.default_eval_per_class)


# ---------------------------------------------------------------------------------------------------------- splits


def assign_speakers(order: Sequence[str], dev_fraction: float, test_fraction: float) -> dict[str, str]:
    """Split one engine's speakers: the first go to train, then dev, and the last to test.

    ``order`` runs from the speaker best suited to training to the one best suited to testing
    (:meth:`Synthesizer.speaker_order`). With two speakers one is test; with three or more, dev and test each
    get at least one. Train always keeps at least one.
    """
    n = len(order)
    n_test = 0 if n < 2 else max(1, round(test_fraction * n)) if test_fraction > 0 else 0
    n_dev = 0 if n < 3 else max(1, round(dev_fraction * n)) if dev_fraction > 0 else 0
    n_train = n - n_dev - n_test
    if n_train < 1:
        raise ConfigError(f"{n} speakers leave none for training with dev {dev_fraction} and test {test_fraction}")
    splits = ["train"] * n_train + ["dev"] * n_dev + ["test"] * n_test
    return dict(zip(order, splits))


def split_voices(cfg: SynthConfig) -> tuple[dict[str, list[Voice]], list[str]]:
    """The voices of each split, and notes on any speaker that a held-out split shares with train.

    Returns:
        ``{split: voices}`` (every split of :data:`SPLITS`) and a list of human-readable notes.
    """
    pools: dict[str, list[Voice]] = {split: [] for split in SPLITS}
    speakers: dict[str, set[tuple[str, str]]] = {split: set() for split in SPLITS}
    for name in cfg.synths:
        synth = get_synthesizer(name)
        voices = synth.voices()
        if not voices:
            raise SpeechPromptError(f"{name} lists no usable voices")
        if name == cfg.heldout_synth:
            roles = {v.speaker: "test_synth" for v in voices}
        else:
            roles = assign_speakers(synth.speaker_order(voices), cfg.dev_fraction, cfg.test_fraction)
        for voice in voices:
            pools[roles[voice.speaker]].append(voice)
            speakers[roles[voice.speaker]].add((voice.speaker, name))
    notes = []
    train_speakers = {s for s, _ in speakers["train"]}
    for split in SPLITS[1:]:
        shared = sorted({s for s, _ in speakers[split]} & train_speakers)
        if shared:
            notes.append(
                f"{split} shares speakers {shared} with train through another engine: it measures a new engine "
                "or voice build, not a new speaker"
            )
    for split in SPLITS:
        if not pools[split]:
            raise SpeechPromptError(f"no voices left for the {split} split with engines {cfg.synths}")
    return pools, notes


# -------------------------------------------------------------------------------------------------------- planning


@dataclass
class Utterance:
    """Everything needed to render one utterance, drawn in advance so that rendering is order-independent."""

    uid: str
    split: str
    relpath: str
    text: str | None
    label: str
    voice: Voice | None
    rate: float | None
    pitch: float | None
    seed: int
    augment: dict[str, Any] | None
    render: dict[str, Any]  # placement, level, noise floor (and the noise of a _silence_ clip)
    intonation: float | None = None  # None: the voice's f0 range cannot be steered

    def request(self) -> Request | None:
        if self.voice is None or self.text is None:
            return None
        return Request(self.text, self.voice, self.rate or 1.0, self.pitch or 1.0, self.intonation or 1.0)

    def meta(self) -> dict[str, Any]:
        return {
            "id": self.uid,
            "path": self.relpath,
            "label": self.label,
            "text": self.text,
            "synth": self.voice.synth if self.voice else None,
            "voice": self.voice.name if self.voice else None,
            "speaker": self.voice.speaker if self.voice else None,
            "rate": self.rate,
            "pitch": self.pitch,
            "intonation": self.intonation,
            "augment": self.augment,
            "render": self.render,
            "seed": self.seed,
        }


def uniform(rng: np.random.Generator, lo_hi: Sequence[float], digits: int = 4) -> float:
    return round(float(rng.uniform(lo_hi[0], lo_hi[1])), digits)


def plan_split(cfg: SynthConfig, split: str, voices: Sequence[Voice]) -> list[Utterance]:
    """Draw every utterance of one split. Each utterance has its own random stream keyed by (seed, split, index),
    so that the size of one split never changes the content of another."""
    task = cfg.task_obj
    per_class, eval_per_class = cfg.resolved_per_class()
    count = per_class if split == "train" else eval_per_class
    classes = [c for c in task.classes() for _ in range(count)]
    order_rng = np.random.default_rng([cfg.seed, _SPLIT_CODE[split], 0])
    classes = [classes[i] for i in order_rng.permutation(len(classes))]
    by_synth: dict[str, list[Voice]] = {}
    for voice in voices:
        by_synth.setdefault(voice.synth, []).append(voice)
    synth_names = sorted(by_synth)
    plan = []
    for index, cls in enumerate(classes):
        rng = np.random.default_rng([cfg.seed, _SPLIT_CODE[split], 1, index])
        item = task.sample(cls, rng)
        render: dict[str, Any] = {"gain_db": uniform(rng, cfg.gain_db_range, 2)}
        render["noise_floor_db"] = uniform(rng, cfg.noise_floor_db_range, 2)
        voice = rate = pitch = intonation = augment = None
        if item.text is None:  # a clip with no speech: noise only
            render["silence"] = {"color": str(rng.choice(["white", "pink", "brown", "hum"])),
                                 "level_db": uniform(rng, cfg.silence_db_range, 2)}  # fmt: skip
        else:
            # Engines are drawn evenly, then a voice within the engine: otherwise espeak-ng's hundreds of voices
            # would drown the handful of flite's, and flite's are what carries over to other engines.
            synth_voices = by_synth[synth_names[int(rng.integers(len(synth_names)))]]
            voice = synth_voices[int(rng.integers(len(synth_voices)))]
            rate = uniform(rng, cfg.rate_range, 3)
            pitch = uniform(rng, cfg.pitch_range, 3) if voice.base_f0 is not None else None
            if voice.base_f0 is not None and voice.synth != "espeak-ng":
                # its own stream, so that adding the style left every other draw of the corpus as it was
                style_rng = np.random.default_rng([cfg.seed, _SPLIT_CODE[split], 2, index])
                intonation = uniform(style_rng, cfg.intonation_range, 3)
            if task.clip_seconds is not None:
                render["offset"] = uniform(rng, [0.0, 1.0], 3)  # fraction of the free space before the word
            else:
                render["pad_s"] = [uniform(rng, [0.1, 0.4], 3), uniform(rng, [0.1, 0.4], 3)]
        if split == "train":
            augment = sample_augmentation(cfg.augment, rng)
            if item.text is None and augment:  # _silence_ stays speech-free: no babble, and no speed/reverb
                augment = {k: v for k, v in augment.items() if k == "noise"} or None
        uid = f"{split}_{index:06d}"
        plan.append(
            Utterance(uid, split, f"{split}/{uid}.wav", item.text, item.label, voice, rate, pitch,
                      int(rng.integers(2**31)), augment, render, intonation)  # fmt: skip
        )
    return plan


