"""What the synthetic corpora say: the tasks (Speech Commands, Fluent Speech Commands intents, digits, sentences),
their vocabularies and their labels, registered by name for ``speechprompt synth --task``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

logger = logging.getLogger(__name__)


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


