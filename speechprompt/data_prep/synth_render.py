"""Rendering a planned utterance: synthesis, silence trimming, level, placement in its clip, augmentation, and
the worker processes that render batches of them."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from speechprompt.data_prep.augment import (
    apply_additive,
    make_noise,
    power,
    reverberate,
    speed_perturb,
    synthetic_rir,
    telephone,
)
from speechprompt.data_prep.synth_plan import SAMPLE_RATE, SPLITS, SynthConfig, Utterance, uniform
from speechprompt.data_prep.synth_tasks import SentencesTask
from speechprompt.data_prep.voices import SYNTHESIZERS, Request, Voice, synthesize
from speechprompt.errors import SpeechPromptError
from speechprompt.fileio import atomic_open

logger = logging.getLogger(__name__)


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
    to the speech, a telephone channel (which carries the room and the noise with the speech), level, recording
    noise floor.

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
    if aug.get("telephone"):
        x = telephone(x, rng)
    x = x * (_db(utt.render["gain_db"]) / max(float(np.abs(x).max()), 1e-9))
    x = x + make_noise("pink", len(x), rng) * _db(utt.render["noise_floor_db"])
    return np.clip(x, -1.0, 1.0).astype(np.float32), facts


def write_wav(path: Path, x: np.ndarray) -> None:
    """16-bit PCM mono WAV at 16 kHz, atomically. Quantised here (not by libsndfile) so it is exact and portable."""
    pcm = np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)
    with atomic_open(path, "wb") as f:
        sf.write(f, pcm, SAMPLE_RATE, subtype="PCM_16", format="WAV")


# Set once per worker process by init_worker: the babble sources, shared by every batch.
_BABBLE: list[np.ndarray] = []


def init_worker(babble_sources: list[np.ndarray]) -> None:
    global _BABBLE
    _BABBLE = babble_sources


def render_batch(batch: list[Utterance], wav_root: str, clip_seconds: float | None) -> list[dict[str, Any]]:
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


def batched(plan: Sequence[Utterance]) -> Iterator[list[Utterance]]:
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
        pitch = uniform(rng, cfg.pitch_range, 3)
        requests.append(Request(text or "", voice, uniform(rng, cfg.rate_range, 3), pitch))
    return [prepare_speech(a, sr) for a, sr in synthesize(requests)]


