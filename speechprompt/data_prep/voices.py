"""The three text-to-speech engines behind ``speechprompt synth``: discovering their voices and driving them.

Each engine is a :class:`Synthesizer` registered by name (``espeak-ng``, ``flite``, ``festival``). It lists its
:class:`Voice` objects and turns a batch of :class:`Request` objects into waveforms at the engine's own sample
rate. Resampling, trimming and augmentation happen later, in :mod:`speechprompt.data_prep.synth`.

Speaking rate and pitch are given engine-independently, as multipliers of the voice's default (``rate=1.2`` is
20% faster, ``pitch=0.9`` a 10% lower mean f0); each engine maps them to its own options. Voices whose f0 cannot be
steered (flite ``rms``, festival's HTS voice) have ``base_f0=None`` and ignore ``pitch``.

Every voice belongs to a *speaker*: the identity behind it. espeak-ng's speaker is the voice variant (``f3``,
``klatt``, ...), shared by all accents; flite's ``kal`` and ``kal16`` and festival's ``kal_diphone`` are one
speaker, as are flite's ``slt`` and festival's HTS ``slt``. Corpus splits are made over speakers, so a held-out
split never hears a training speaker through another engine.

Process start-up dominates the cost of these engines (about 10-40 ms per utterance for espeak-ng and flite, about
0.3 s per festival process), so festival is driven with one Scheme script per batch.
"""

from __future__ import annotations

import functools
import hashlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import soundfile as sf

from speechprompt.errors import SpeechPromptError


class SynthesizerMissingError(SpeechPromptError):
    """A text-to-speech engine that is not installed. The message names the binary and its apt package."""


class SynthesisError(SpeechPromptError):
    """An engine that ran but failed to produce audio."""


@dataclass(frozen=True)
class Voice:
    """One voice of one engine.

    Attributes:
        synth: the engine's registry name.
        name: what the engine is given to select the voice (``en-us+f3``, ``slt``, ``kal_diphone``).
        speaker: the identity behind the voice; splits are made over speakers.
        gender: ``"f"``, ``"m"`` or ``"?"``.
        sample_rate: the engine's output rate for this voice, in Hz.
        base_f0: the voice's default mean f0 in Hz, or None if its pitch cannot be steered.
    """

    synth: str
    name: str
    speaker: str
    gender: str
    sample_rate: int
    base_f0: float | None

    @property
    def id(self) -> str:
        """A unique, readable identifier: ``engine:name``."""
        return f"{self.synth}:{self.name}"


@dataclass(frozen=True)
class Request:
    """One utterance to synthesize.

    Attributes:
        text: the words to say (letters, digits, spaces and plain punctuation).
        voice: the voice to say them with.
        rate: speaking-rate multiplier of the voice's default (above 1 is faster).
        pitch: mean-f0 multiplier of the voice's default; ignored when ``voice.base_f0`` is None.
        intonation: multiplier of the f0 range (a speaking style: below 1 flatter, toward monotone; above 1 livelier),
            around a standard deviation of 14% of the mean f0; flite and festival's diphone voices only (espeak-ng
            has no such option, and its variants differ in range already), and not where ``base_f0`` is None.
    """

    text: str
    voice: Voice
    rate: float = 1.0
    pitch: float = 1.0
    intonation: float = 1.0

    def __post_init__(self) -> None:
        if not _TEXT_RE.fullmatch(self.text):
            raise SynthesisError(f"text {self.text!r} has characters the engines are not given (letters, digits, "
                                 "spaces and .,?!'- only)")
        if not (0.25 <= self.rate <= 4.0 and 0.25 <= self.pitch <= 4.0 and 0.25 <= self.intonation <= 4.0):
            raise SynthesisError(f"rate {self.rate}, pitch {self.pitch} and intonation {self.intonation} must lie in "
                                 "[0.25, 4]")


# The f0 standard deviation of a neutral reading, as a fraction of the mean f0 (festival's diphone voices ship
# 14 Hz at 105 Hz); a Request's intonation multiplies it.
F0_STD_FRACTION = 0.14

# Plain text only: it is passed on command lines and inside Scheme strings, and must never start an option.
_TEXT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 .,?!'\-]*")


def require_binary(binary: str, apt_package: str) -> str:
    """The full path of ``binary``, or a :class:`SynthesizerMissingError` saying which apt package provides it."""
    path = shutil.which(binary)
    if path is None:
        raise SynthesizerMissingError(
            f"{binary} not found on PATH; install it with `sudo apt-get install {apt_package}` "
            f"(or leave its engine out with --synths)"
        )
    return path


def _run(cmd: list[str], stdin: str | None = None, check: bool = True) -> str:
    """Run an engine; a failure becomes a :class:`SynthesisError` with the command and the end of its stderr."""
    try:
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False, timeout=600)
    except OSError as e:
        raise SynthesisError(f"cannot run {cmd[0]}: {e.strerror}") from None
    if check and proc.returncode != 0:
        raise SynthesisError(f"{' '.join(cmd[:3])} ... exited with {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return proc.stdout


def _read_wav(path: Path, what: str) -> tuple[np.ndarray, int]:
    """A mono float32 waveform and its rate; an empty or missing file is a :class:`SynthesisError`."""
    try:
        audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise SynthesisError(f"{what}: no readable audio was written ({e})") from None
    if audio.shape[0] == 0:
        raise SynthesisError(f"{what}: the engine wrote an empty waveform")
    return audio.mean(axis=1), int(sr)  # (T,)


def _stable_order(names: Sequence[str]) -> list[str]:
    """Names in an order that depends only on the names themselves (not on --seed, not on discovery order)."""
    return sorted(names, key=lambda n: hashlib.sha1(n.encode()).hexdigest())


class Synthesizer:
    """A text-to-speech engine. Subclasses set the class attributes and implement the three methods."""

    name: ClassVar[str]
    binary: ClassVar[str]
    apt_package: ClassVar[str]
    batch_size: ClassVar[int] = 16  # requests per worker task

    def check(self) -> str:
        """The binary's path; raises :class:`SynthesizerMissingError` if it is not installed."""
        return require_binary(self.binary, self.apt_package)

    def version(self) -> str:
        """The engine's version line (recorded in ``corpus.json``: output is byte-identical only per version)."""
        raise NotImplementedError

    def voices(self) -> list[Voice]:
        """Every usable voice, in a stable order."""
        raise NotImplementedError

    def speaker_order(self, voices: Sequence[Voice]) -> list[str]:
        """The speakers from the best suited to training to the best suited to held-out testing."""
        return _stable_order(sorted({v.speaker for v in voices}))

    def synthesize(self, requests: Sequence[Request], workdir: Path) -> list[tuple[np.ndarray, int]]:
        """Waveforms ``(T,)`` float32 with their sample rates, one per request, in order."""
        raise NotImplementedError


SYNTHESIZERS: dict[str, type[Synthesizer]] = {}


def register_synthesizer(cls: type[Synthesizer]) -> type[Synthesizer]:
    """Class decorator: make an engine available by its ``name``."""
    if cls.name in SYNTHESIZERS:
        raise ValueError(f"synthesizer {cls.name!r} is registered twice")
    SYNTHESIZERS[cls.name] = cls
    return cls


@functools.cache
def get_synthesizer(name: str) -> Synthesizer:
    """The engine registered as ``name``, checked to be installed."""
    if name not in SYNTHESIZERS:
        raise SpeechPromptError(f"unknown synthesizer {name!r}; known: {', '.join(SYNTHESIZERS)}")
    synth = SYNTHESIZERS[name]()
    synth.check()
    return synth


# ----------------------------------------------------------------------------------------------------- espeak-ng


# `espeak-ng --voices` prints fixed columns; the file column may hold a space ("!v/Mr serious").
_ESPEAK_LINE = re.compile(
    r"^\s*\d+\s+(?P<lang>\S+)\s+\S+/(?P<gender>[MF-])\s+(?P<vname>\S+)\s+(?P<file>.+?)\s*(\(.*)?$"
)


@register_synthesizer
class EspeakNg(Synthesizer):
    """espeak-ng: formant (and Klatt) synthesis. Every English accent is combined with every voice variant.

    Accents are the ``gmw/en*`` voices (``en-us``, ``en-gb-scotland``, ``en-029``, ...); the MBROLA voices are left
    out because their diphone databases are separate packages. The speaker is the variant (``f3``, ``klatt``),
    so a held-out speaker is a timbre never heard in training, in any accent. Output is 22.05 kHz.
    """

    name = "espeak-ng"
    binary = "espeak-ng"
    apt_package = "espeak-ng"
    batch_size = 16
    default_wpm: ClassVar[int] = 175
    # espeak's -p (0-99, default 50) moves the mean f0 by about one octave per 72 steps (measured on en-us).
    pitch_steps_per_octave: ClassVar[float] = 72.0
    sample_rate: ClassVar[int] = 22050

    def version(self) -> str:
        return _run([self.binary, "--version"]).split("Data at")[0].strip()

    def _list(self, which: str) -> list[tuple[str, str, str]]:
        """``(language, gender, file)`` rows of ``espeak-ng --voices=<which>``."""
        rows = []
        for line in _run([self.binary, f"--voices={which}"]).splitlines()[1:]:
            m = _ESPEAK_LINE.match(line)
            if m:
                rows.append((m["lang"], m["gender"].lower().replace("-", "?"), m["file"]))
        return rows

    def voices(self) -> list[Voice]:
        accents = sorted({lang for lang, _, file in self._list("en") if file.startswith("gmw/")})
        variants = sorted({(file.removeprefix("!v/"), g) for lang, g, file in self._list("variant")})
        # The plain accent voice (no +variant) is a speaker of its own, named "default".
        variants = [("", "m"), *variants]
        return [
            Voice(
                self.name,
                f"{accent}+{variant}" if variant else accent,
                speaker=variant or "default",
                gender=gender,
                sample_rate=self.sample_rate,
                base_f0=100.0,  # nominal: pitch is mapped through -p, relative to the variant's own default
            )
            for variant, gender in variants
            for accent in accents
        ]

    def synthesize(self, requests: Sequence[Request], workdir: Path) -> list[tuple[np.ndarray, int]]:
        out = []
        for i, req in enumerate(requests):
            wav = workdir / f"espeak{i}.wav"
            wpm = round(self.default_wpm * req.rate)
            pitch = round(50 + self.pitch_steps_per_octave * float(np.log2(req.pitch)))
            pitch = min(max(pitch, 0), 99)
            # The text goes through stdin, so that nothing in it can be read as an option.
            _run([self.binary, "-v", req.voice.name, "-s", str(wpm), "-p", str(pitch), "-w", str(wav)], req.text)
            out.append(_read_wav(wav, f"espeak-ng {req.voice.name} {req.text!r}"))
        return out


# ---------------------------------------------------------------------------------------------------------- flite


@register_synthesizer
class Flite(Synthesizer):
    """CMU flite: diphone (``kal`` at 8 kHz, ``kal16``) and clustergen (``awb``, ``rms``, ``slt``) voices.

    Rate is ``duration_stretch``; pitch is ``int_f0_target_mean`` (no effect on ``rms``, which therefore has no
    ``base_f0``). Limited-domain voices (``awb_time`` only says the time) are left out.
    """

    name = "flite"
    binary = "flite"
    apt_package = "flite"
    batch_size = 16
    # speaker, gender, rate, mean f0 measured at the default settings (None: int_f0_target_mean has no effect).
    KNOWN: ClassVar[dict[str, tuple[str, str, int, float | None]]] = {
        "awb": ("awb", "m", 16000, 127.0),
        "rms": ("rms", "m", 16000, None),
        "kal": ("kal", "m", 8000, 90.0),
        "kal16": ("kal", "m", 16000, 90.0),
        "slt": ("slt", "f", 16000, 170.0),
    }
    LIMITED_DOMAIN: ClassVar[frozenset[str]] = frozenset({"awb_time"})
    # Training first, held out last: kal and slt are also festival's speakers, so keeping them out of training
    # keeps festival's held-out split free of training speakers.
    PREFERRED_ORDER: ClassVar[tuple[str, ...]] = ("awb", "rms", "kal", "slt")

    def version(self) -> str:
        # flite prints its version and exits with status 1.
        return " ".join(_run([self.binary, "--version"], check=False).split())

    def voices(self) -> list[Voice]:
        listed = _run([self.binary, "-lv"]).split(":", 1)[-1].split()
        voices = []
        for name in sorted(listed):
            if name in self.LIMITED_DOMAIN:
                continue
            speaker, gender, sr, f0 = self.KNOWN.get(name, (name, "?", 16000, None))
            voices.append(Voice(self.name, name, speaker, gender, sr, f0))
        return voices

    def speaker_order(self, voices: Sequence[Voice]) -> list[str]:
        speakers = {v.speaker for v in voices}
        known = [s for s in self.PREFERRED_ORDER if s in speakers]
        return [*_stable_order(sorted(speakers - set(known))), *known]

    def synthesize(self, requests: Sequence[Request], workdir: Path) -> list[tuple[np.ndarray, int]]:
        out = []
        for i, req in enumerate(requests):
            wav = workdir / f"flite{i}.wav"
            cmd = [self.binary, "-voice", req.voice.name, "--setf", f"duration_stretch={1.0 / req.rate:.4f}"]
            if req.voice.base_f0 is not None:
                f0 = req.voice.base_f0 * req.pitch
                cmd += ["--setf", f"int_f0_target_mean={f0:.2f}",
                        "--setf", f"int_f0_target_stddev={F0_STD_FRACTION * f0 * req.intonation:.2f}"]
            _run([*cmd, "-t", req.text, "-o", str(wav)])
            out.append(_read_wav(wav, f"flite {req.voice.name} {req.text!r}"))
        return out


# ------------------------------------------------------------------------------------------------------- festival


@register_synthesizer
class Festival(Synthesizer):
    """The Festival Speech Synthesis System: the diphone voices ``kal_diphone`` and ``ked_diphone`` (16 kHz, two US
    male speakers; Debian's ``festvox-kallpc16k`` and ``festvox-kdlpc16k``) and the HTS voice ``cmu_us_slt_arctic_hts``.

    One ``festival -b`` process synthesizes a whole batch from a Scheme script. Rate is ``Duration_Stretch`` for
    the diphone voice and the HTS engine's ``-r`` option for the HTS voice (which ignores ``Duration_Stretch``);
    pitch is the diphone voice's ``int_lr_params`` target mean. The HTS voice has no pitch control.
    """

    name = "festival"
    binary = "festival"
    apt_package = "festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts"
    batch_size = 48
    # speaker, gender, rate, mean f0, default Duration_Stretch set by the voice (kal_diphone sets 1.1)
    KNOWN: ClassVar[dict[str, tuple[str, str, int, float | None]]] = {
        "kal_diphone": ("kal", "m", 16000, 105.0),
        "ked_diphone": ("ked", "m", 16000, 105.0),
        "cmu_us_slt_arctic_hts": ("slt", "f", 32000, None),
    }
    DEFAULT_STRETCH: ClassVar[dict[str, float]] = {"kal_diphone": 1.1, "ked_diphone": 1.1}
    PREFERRED_ORDER: ClassVar[tuple[str, ...]] = ("kal", "ked", "slt")

    def version(self) -> str:
        return _run([self.binary, "--version"]).strip()

    def voices(self) -> list[Voice]:
        listed = re.findall(r"[\w\-]+", _run([self.binary, "-b", "(print (voice.list))"]))
        voices = []
        for name in sorted(set(listed)):
            speaker, gender, sr, f0 = self.KNOWN.get(name, (name, "?", 16000, None))
            voices.append(Voice(self.name, name, speaker, gender, sr, f0))
        return voices

    def speaker_order(self, voices: Sequence[Voice]) -> list[str]:
        speakers = {v.speaker for v in voices}
        known = [s for s in self.PREFERRED_ORDER if s in speakers]
        return [*_stable_order(sorted(speakers - set(known))), *known]

    def _scheme(self, req: Request, wav: Path) -> str:
        """The Scheme that synthesizes one request into ``wav``. Every parameter is set, so none leaks onward."""
        voice = req.voice.name
        lines = [f"(voice_{voice})"]
        if voice.endswith("_hts"):
            # HTS voices keep their engine options in <voice>::hts_engine_params; -r is the speed-up factor.
            lines.append(
                f"(set! hts_engine_params (append {voice}::hts_engine_params '((\"-r\" {req.rate:.4f}))))"
            )
        else:
            stretch = self.DEFAULT_STRETCH.get(voice, 1.0) / req.rate
            lines.append(f"(Parameter.set 'Duration_Stretch {stretch:.4f})")
        if req.voice.base_f0 is not None:
            f0 = req.voice.base_f0 * req.pitch
            lines.append(
                f"(set! int_lr_params '((target_f0_mean {f0:.2f}) "
                f"(target_f0_std {F0_STD_FRACTION * f0 * req.intonation:.2f}) "
                "(model_f0_mean 170) (model_f0_std 34)))"
            )
        lines.append(f'(set! utt (SynthText "{req.text}"))')
        lines.append(f"(utt.save.wave utt \"{wav}\" 'riff)")
        return "\n".join(lines)

    def synthesize(self, requests: Sequence[Request], workdir: Path) -> list[tuple[np.ndarray, int]]:
        wavs = [workdir / f"festival{i}.wav" for i in range(len(requests))]
        script = workdir / "batch.scm"
        script.write_text("\n".join(self._scheme(r, w) for r, w in zip(requests, wavs)) + "\n", encoding="utf-8")
        _run([self.binary, "-b", str(script)])
        return [_read_wav(w, f"festival {r.voice.name} {r.text!r}") for r, w in zip(requests, wavs)]


def synthesize(requests: Sequence[Request]) -> list[tuple[np.ndarray, int]]:
    """Synthesize requests of any engines, batched per engine; waveforms ``(T,)`` and rates, in request order."""
    out: list[tuple[np.ndarray, int] | None] = [None] * len(requests)
    by_synth: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
        by_synth.setdefault(req.voice.synth, []).append(i)
    with tempfile.TemporaryDirectory(prefix="speechprompt-synth-") as tmp:
        for synth_name, idx in by_synth.items():
            results = get_synthesizer(synth_name).synthesize([requests[i] for i in idx], Path(tmp))
            for i, result in zip(idx, results):
                out[i] = result
    return out  # type: ignore[return-value]
