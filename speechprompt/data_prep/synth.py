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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import soundfile as sf
import soxr

from speechprompt.config import ConfigError, apply_overrides, describe, from_dict, option, to_dict
from speechprompt.data_prep.augment import (
    AugmentConfig,
    apply_additive,
    make_noise,
    power,
    reverberate,
    sample_augmentation,
    speed_perturb,
    synthetic_rir,
)
from speechprompt.data_prep.manifest import (
    Manifest,
    ManifestEntry,
    validate_manifest,
    write_labels,
    write_manifest_file,
)
from speechprompt.data_prep.voices import SYNTHESIZERS, Request, Voice, get_synthesizer, synthesize
from speechprompt.errors import SpeechPromptError
from speechprompt.fileio import atomic_open, read_json, write_json
from speechprompt.progress import Progress

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
SPLITS: tuple[str, ...] = ("train", "dev", "test", "test_synth")
_SPLIT_CODE = {name: i for i, name in enumerate(SPLITS)}  # part of every random stream's key


# ----------------------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Item:
    """What a task asks to be said: ``text`` (None for a clip with no speech) and its ``label``."""

    text: str | None
    label: str


class Task:
    """A corpus task: its classes and how to draw the text of an utterance of a class."""

    name: ClassVar[str]
    default_per_class: ClassVar[int]
    default_eval_per_class: ClassVar[int]
    # Fixed clip length in seconds (the word is placed at a random offset), or None for padded utterances.
    clip_seconds: ClassVar[float | None] = None

    def classes(self) -> list[str]:
        """The classes, each given ``per_class`` training utterances."""
        raise NotImplementedError

    def sample(self, cls: str, rng: np.random.Generator) -> Item:
        """One utterance of class ``cls``."""
        raise NotImplementedError


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task available to ``--task`` by its ``name``."""
    TASKS[cls.name] = cls
    return cls


COMMAND_WORDS: tuple[str, ...] = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
# Speech Commands v1's auxiliary words, which its 12-class setup labels _unknown_.
UNKNOWN_WORDS: tuple[str, ...] = (
    "bed", "bird", "cat", "dog", "happy", "house", "marvin", "sheila", "tree", "wow",
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)  # fmt: skip
UNKNOWN, SILENCE = "_unknown_", "_silence_"


@register_task
class CommandsTask(Task):
    """Speech Commands v1, 12 classes: 10 command words, ``_unknown_`` (other words) and ``_silence_`` (noise)."""

    name = "commands"
    default_per_class = 60
    default_eval_per_class = 20
    clip_seconds = 1.0

    def classes(self) -> list[str]:
        return [*COMMAND_WORDS, UNKNOWN, SILENCE]

    def sample(self, cls: str, rng: np.random.Generator) -> Item:
        if cls == SILENCE:
            return Item(None, SILENCE)
        if cls == UNKNOWN:
            return Item(str(rng.choice(UNKNOWN_WORDS)), UNKNOWN)
        return Item(cls, cls)


# Fluent Speech Commands' 31 intents, as action|object|location with its label vocabulary.
FSC_INTENTS: tuple[tuple[str, str, str], ...] = (
    *[("change language", lang, "none") for lang in ("Chinese", "English", "German", "Korean", "none")],
    ("activate", "lamp", "none"), ("activate", "music", "none"),
    *[("activate", "lights", loc) for loc in ("bedroom", "kitchen", "none", "washroom")],
    *[("bring", obj, "none") for obj in ("juice", "newspaper", "shoes", "socks")],
    ("deactivate", "lamp", "none"), ("deactivate", "music", "none"),
    *[("deactivate", "lights", loc) for loc in ("bedroom", "kitchen", "none", "washroom")],
    *[("decrease", "heat", loc) for loc in ("bedroom", "kitchen", "none", "washroom")],
    ("decrease", "volume", "none"),
    *[("increase", "heat", loc) for loc in ("bedroom", "kitchen", "none", "washroom")],
    ("increase", "volume", "none"),
)  # fmt: skip

# Phrasings per (action, object). "{pre}" becomes "kitchen " and "{post}" " in the kitchen"; a phrasing with
# either can carry a location, and one of the two is filled (the other left empty).
_PHRASES: dict[tuple[str, str], tuple[str, ...]] = {
    ("activate", "lights"): ("turn on the {pre}lights{post}", "switch on the {pre}lights{post}",
                             "turn the {pre}lights on{post}", "{pre}lights on{post}",
                             "switch the {pre}lights on{post}"),
    ("deactivate", "lights"): ("turn off the {pre}lights{post}", "switch off the {pre}lights{post}",
                               "turn the {pre}lights off{post}", "{pre}lights off{post}",
                               "switch the {pre}lights off{post}"),
    ("activate", "lamp"): ("turn on the lamp", "switch on the lamp", "lamp on", "turn the lamp on"),
    ("deactivate", "lamp"): ("turn off the lamp", "switch off the lamp", "lamp off", "turn the lamp off"),
    ("activate", "music"): ("play the music", "play music", "put on some music", "start the music", "music on"),
    ("deactivate", "music"): ("stop the music", "pause the music", "turn off the music", "music off"),
    ("increase", "heat"): ("turn up the {pre}heat{post}", "increase the {pre}heating{post}",
                           "increase the temperature{post}", "make it warmer{post}", "turn the {pre}heat up{post}",
                           "it is too cold{post}"),
    ("decrease", "heat"): ("turn down the {pre}heat{post}", "decrease the {pre}heating{post}",
                           "lower the temperature{post}", "make it cooler{post}", "turn the {pre}heat down{post}",
                           "it is too hot{post}"),
    ("increase", "volume"): ("turn up the volume", "increase the volume", "louder", "make it louder", "volume up",
                             "I can't hear that"),
    ("decrease", "volume"): ("turn down the volume", "decrease the volume", "quieter", "make it quieter",
                             "volume down", "that's too loud"),
    ("bring", "*"): ("bring me the {obj}", "bring me my {obj}", "get me the {obj}", "fetch my {obj}",
                     "go get the {obj}", "I need my {obj}"),
    ("bring", "juice"): ("bring me some juice", "get me some juice", "fetch the juice", "I want juice",
                         "bring me juice"),
    ("change language", "*"): ("change the language to {obj}", "switch to {obj}", "set the language to {obj}",
                               "I want to use {obj}", "{obj} please", "use {obj}"),
    ("change language", "none"): ("change the language", "switch the language", "change language",
                                  "language settings", "use a different language"),
}  # fmt: skip


def intent_phrasings(action: str, obj: str, location: str) -> list[str]:
    """Every phrasing of one intent (e.g. ``turn on the kitchen lights`` for ``activate|lights|kitchen``)."""
    templates = _PHRASES.get((action, obj)) or _PHRASES[(action, "*")]
    out = []
    for template in templates:
        has_slot = "{pre}" in template or "{post}" in template
        if location == "none":
            out.append(template.format(pre="", post="", obj=obj.lower()))
        elif has_slot:  # FSC says the location either way: "kitchen lights" and "lights in the kitchen"
            if "{pre}" in template:
                out.append(template.format(pre=f"{location} ", post="", obj=obj.lower()))
            if "{post}" in template:
                out.append(template.format(pre="", post=f" in the {location}", obj=obj.lower()))
    if not out:
        raise ValueError(f"no phrasing says the location of {action}|{obj}|{location}")
    return out


@register_task
class IntentTask(Task):
    """Fluent-Speech-Commands-like intents: label ``action|object|location``, several phrasings each."""

    name = "intent"
    default_per_class = 20
    default_eval_per_class = 5

    def classes(self) -> list[str]:
        return ["|".join(intent) for intent in FSC_INTENTS]

    def sample(self, cls: str, rng: np.random.Generator) -> Item:
        phrasings = intent_phrasings(*cls.split("|"))
        return Item(phrasings[int(rng.integers(len(phrasings)))], cls)


DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@register_task
class DigitsTask(Task):
    """Spoken digit strings of 3 to 7 digits; the label is the words (``three one four``). Classes are lengths."""

    name = "digits"
    default_per_class = 60
    default_eval_per_class = 20
    lengths: ClassVar[tuple[int, ...]] = (3, 4, 5, 6, 7)

    def classes(self) -> list[str]:
        return [str(n) for n in self.lengths]

    def sample(self, cls: str, rng: np.random.Generator) -> Item:
        text = " ".join(DIGIT_WORDS[int(d)] for d in rng.integers(0, 10, size=int(cls)))
        return Item(text, text)


# A few hundred common words, the command and auxiliary words included, for unit-LM pretraining sentences.
SENTENCE_VOCAB: tuple[str, ...] = tuple(sorted(set((
    " ".join(COMMAND_WORDS) + " " + " ".join(UNKNOWN_WORDS) + " " + " ".join(DIGIT_WORDS) + """
    the a an and or but if then when where what who why how this that these those here there now today tomorrow
    yesterday always never often again very much many more most some any all each every other another same new old
    good bad big small long short high low hot cold warm cool fast slow early late first last next little great
    right wrong true open close closed light dark red blue green yellow black white brown gray
    i you he she it we they me him her us them my your his its our their mine yours
    is are was were be been being have has had do does did will would can could should may might must shall
    go goes went come came get got make made take took give gave see saw look looked find found know knew think
    thought say said tell told ask asked want wanted need use used try tried work worked call called turn turned
    play played start stop started stopped run ran walk walked talk talked read write wrote sing sang eat ate
    drink drank sleep slept wait waited move moved bring brought put keep kept let leave left help helped show
    hold held hear heard feel felt live lived stay stayed sit sat stand stood watch watched listen listened
    time day night week year morning evening hour minute home house room kitchen bedroom door window table chair
    bed floor wall car road street city town country world water food bread milk juice tea coffee music song
    book paper newspaper letter phone computer radio lamp lights heat volume language money job school teacher
    student friend family mother father brother sister child children man woman people dog cat bird horse fish
    tree flower garden river sea sun moon star sky rain snow wind fire cloud hand head eye face heart voice name
    word story question answer idea problem thing place way side part end point number group
    in out of to from with without about over under between into through after before around near far along
    back away down off together
    """).split())))


@register_task
class SentencesTask(Task):
    """Unlabelled random-word sentences (4-10 words) for unit-LM pretraining; the label file holds the text."""

    name = "sentences"
    default_per_class = 400
    default_eval_per_class = 50

    def classes(self) -> list[str]:
        return ["sentence"]

    def sample(self, cls: str, rng: np.random.Generator) -> Item:
        words = rng.choice(SENTENCE_VOCAB, size=int(rng.integers(4, 11)))
        text = " ".join(str(w) for w in words)
        return Item(text, text)


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
        for name in ("rate_range", "pitch_range", "gain_db_range", "noise_floor_db_range", "silence_db_range"):
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

    def request(self) -> Request | None:
        if self.voice is None or self.text is None:
            return None
        return Request(self.text, self.voice, self.rate or 1.0, self.pitch or 1.0)

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
            "augment": self.augment,
            "render": self.render,
            "seed": self.seed,
        }


def _uniform(rng: np.random.Generator, lo_hi: Sequence[float], digits: int = 4) -> float:
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
        render: dict[str, Any] = {"gain_db": _uniform(rng, cfg.gain_db_range, 2)}
        render["noise_floor_db"] = _uniform(rng, cfg.noise_floor_db_range, 2)
        voice = rate = pitch = augment = None
        if item.text is None:  # a clip with no speech: noise only
            render["silence"] = {"color": str(rng.choice(["white", "pink", "brown", "hum"])),
                                 "level_db": _uniform(rng, cfg.silence_db_range, 2)}  # fmt: skip
        else:
            # Engines are drawn evenly, then a voice within the engine: otherwise espeak-ng's hundreds of voices
            # would drown the handful of flite's, and flite's are what carries over to other engines.
            synth_voices = by_synth[synth_names[int(rng.integers(len(synth_names)))]]
            voice = synth_voices[int(rng.integers(len(synth_voices)))]
            rate = _uniform(rng, cfg.rate_range, 3)
            pitch = _uniform(rng, cfg.pitch_range, 3) if voice.base_f0 is not None else None
            if task.clip_seconds is not None:
                render["offset"] = _uniform(rng, [0.0, 1.0], 3)  # fraction of the free space before the word
            else:
                render["pad_s"] = [_uniform(rng, [0.1, 0.4], 3), _uniform(rng, [0.1, 0.4], 3)]
        if split == "train":
            augment = sample_augmentation(cfg.augment, rng)
            if item.text is None and augment:  # _silence_ stays speech-free: no babble, and no speed/reverb
                augment = {k: v for k, v in augment.items() if k == "noise"} or None
        uid = f"{split}_{index:06d}"
        plan.append(
            Utterance(uid, split, f"{split}/{uid}.wav", item.text, item.label, voice, rate, pitch,
                      int(rng.integers(2**31)), augment, render)  # fmt: skip
        )
    return plan


# ------------------------------------------------------------------------------------------------------- rendering


def trim_silence(x: np.ndarray, threshold_db: float = -40.0, margin_s: float = 0.02) -> np.ndarray:
    """Cut the leading and trailing stretches quieter than ``threshold_db`` below the loudest 10 ms frame."""
    frame = SAMPLE_RATE // 100
    n = len(x) // frame
    if n == 0:
        return x
    rms = np.sqrt(np.mean(np.square(x[: n * frame].reshape(n, frame), dtype=np.float64), axis=1))  # (n,)
    active = np.flatnonzero(rms > rms.max() * 10 ** (threshold_db / 20))
    if len(active) == 0:
        return x
    margin = int(margin_s * SAMPLE_RATE)
    return x[max(0, active[0] * frame - margin) : min(len(x), (active[-1] + 1) * frame + margin)]


def prepare_speech(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Engine output -> 16 kHz, trimmed, peak-normalised float32 ``(T,)``."""
    x = np.asarray(audio, dtype=np.float32)
    if sample_rate != SAMPLE_RATE:
        x = soxr.resample(x, sample_rate, SAMPLE_RATE)
    x = trim_silence(x)
    peak = float(np.abs(x).max()) if len(x) else 0.0
    if peak == 0.0:
        raise SpeechPromptError("an engine produced a silent waveform")
    return (x / peak).astype(np.float32)


def _db(level: float) -> float:
    return 10 ** (level / 20)


def render(utt: Utterance, speech: np.ndarray | None, clip_seconds: float | None,
           babble_sources: Sequence[np.ndarray]) -> tuple[np.ndarray, dict[str, Any]]:  # fmt: skip
    """Turn prepared speech (or None for a no-speech clip) into the final waveform of ``utt``.

    Order: speed perturbation, placement (1 s window or padding), reverberation, babble and noise at SNRs relative
    to the speech, level, recording noise floor.

    Returns:
        The waveform ``(T,)`` float32 in [-1, 1] and facts learned while rendering (e.g. ``fit_speed``).
    """
    rng = np.random.default_rng(utt.seed)
    aug = utt.augment or {}
    facts: dict[str, Any] = {}
    if speech is None:
        n = round((clip_seconds or 1.0) * SAMPLE_RATE)
        silence = utt.render["silence"]
        x = make_noise(silence["color"], n, rng) * _db(silence["level_db"])
        x = apply_additive(x, aug, rng, ref_power=power(x))
        return np.clip(x, -1.0, 1.0).astype(np.float32), facts
    x = speech
    if "speed" in aug:
        x = speed_perturb(x, aug["speed"])
    speech_power = power(x)
    if clip_seconds is not None:
        n = round(clip_seconds * SAMPLE_RATE)
        if len(x) > n:  # Speech Commands keeps the whole word in 1 s; a long one is sped up to fit
            facts["fit_speed"] = round(len(x) / n, 4)
            x = speed_perturb(x, len(x) / n)
        start = int(utt.render["offset"] * (n - len(x)))
        x = np.pad(x, (start, n - len(x) - start))
    else:
        lead, tail = (round(s * SAMPLE_RATE) for s in utt.render["pad_s"])
        x = np.pad(x, (lead, tail))
    if "reverb" in aug:  # after padding, so that the tail rings into the silence after the word
        x = reverberate(x, synthetic_rir(aug["reverb"]["rt60"], rng))
    x = apply_additive(x, aug, rng, ref_power=speech_power, babble_sources=babble_sources)
    x = x * (_db(utt.render["gain_db"]) / max(float(np.abs(x).max()), 1e-9))
    x = x + make_noise("pink", len(x), rng) * _db(utt.render["noise_floor_db"])
    return np.clip(x, -1.0, 1.0).astype(np.float32), facts


def write_wav(path: Path, x: np.ndarray) -> None:
    """16-bit PCM mono WAV at 16 kHz, atomically. Quantised here (not by libsndfile) so it is exact and portable."""
    pcm = np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)
    with atomic_open(path, "wb") as f:
        sf.write(f, pcm, SAMPLE_RATE, subtype="PCM_16", format="WAV")


# Set once per worker process by _init_worker: the babble sources, shared by every batch.
_BABBLE: list[np.ndarray] = []


def _init_worker(babble_sources: list[np.ndarray]) -> None:
    global _BABBLE
    _BABBLE = babble_sources


def _render_batch(batch: list[Utterance], wav_root: str, clip_seconds: float | None) -> list[dict[str, Any]]:
    """Synthesize, render and write a batch; one ``{"num_samples", "facts"}`` per utterance, in order."""
    requests = [u.request() for u in batch]
    wanted = [r for r in requests if r is not None]
    synthesized = iter(synthesize(wanted)) if wanted else iter(())
    out = []
    for utt, req in zip(batch, requests):
        speech = prepare_speech(*next(synthesized)) if req is not None else None
        x, facts = render(utt, speech, clip_seconds, _BABBLE)
        write_wav(Path(wav_root) / utt.relpath, x)
        out.append({"num_samples": len(x), "facts": facts})
    return out


def _batches(plan: Sequence[Utterance]) -> Iterator[list[Utterance]]:
    """Consecutive utterances of one engine, up to its batch size (festival amortises its start-up over it)."""
    by_synth: dict[str, list[Utterance]] = {}
    for utt in plan:
        by_synth.setdefault(utt.voice.synth if utt.voice else "", []).append(utt)
    for name, utts in sorted(by_synth.items()):
        size = SYNTHESIZERS[name].batch_size if name else 64
        for i in range(0, len(utts), size):
            yield utts[i : i + size]


def make_babble_sources(cfg: SynthConfig, voices: Sequence[Voice]) -> list[np.ndarray]:
    """Sentences said by training voices, prepared at 16 kHz: what babble is made of."""
    aug = cfg.augment
    if cfg.babble_sources == 0 or aug.fraction == 0 or aug.babble_prob == 0:
        return []
    rng = np.random.default_rng([cfg.seed, len(SPLITS), 0])
    sentences = SentencesTask()
    requests = []
    for _ in range(cfg.babble_sources):
        voice = voices[int(rng.integers(len(voices)))]
        text = sentences.sample("sentence", rng).text
        pitch = _uniform(rng, cfg.pitch_range, 3)
        requests.append(Request(text or "", voice, _uniform(rng, cfg.rate_range, 3), pitch))
    return [prepare_speech(a, sr) for a, sr in synthesize(requests)]


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
    batches = list(_batches(all_utts))
    with Progress(len(all_utts), f"synth {cfg.task}", unit="utt", enabled=progress) as bar:
        if cfg.workers == 1:
            _init_worker(babble_sources)
            outputs: Iterator[list[dict[str, Any]]] = (
                _render_batch(b, str(wav_root), task.clip_seconds) for b in batches
            )
            for batch, res in zip(batches, outputs):
                results.update({u.uid: r for u, r in zip(batch, res)})
                bar.update(len(batch))
        else:
            # spawn, not fork: the parent may hold threads (torch, a progress bar) that a forked child would inherit
            # locked.
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=_init_worker,
                                     initargs=(babble_sources,)) as pool:  # fmt: skip
                futures = [pool.submit(_render_batch, b, str(wav_root), task.clip_seconds) for b in batches]
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

