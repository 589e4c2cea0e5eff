"""Waveform augmentation for synthetic speech: speed perturbation, noise, babble, rooms and telephone channels.

Synthetic voices are clean, level and dry; real recordings are none of these. Each function here takes a 16 kHz
mono float waveform ``(T,)`` and an explicit :class:`numpy.random.Generator`, so that a corpus is a pure function
of its seed. :class:`AugmentConfig` says how often and how strongly each is applied; :func:`sample_augmentation`
draws the parameters of one utterance (they are recorded in the corpus metadata) and :func:`apply_augmentation`
applies them.

SNRs are measured against the power of the speech itself (``ref_power``), not of the clip it sits in, so that a
short word padded with silence is not given more noise than its SNR says.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import soxr

from speechprompt.config import ConfigError, option

NOISE_COLORS: dict[str, float] = {"white": 0.0, "pink": 1.0, "brown": 2.0}  # power spectrum ~ 1 / f^exponent


@dataclass
class AugmentConfig:
    """How the training split is augmented. Each augmented utterance gets one or more of the effects below.

    The defaults are moderate on purpose. On a 60-per-class commands corpus, a pooled log-mel logistic regression
    scored test/test_synth 0.54/0.40 with no augmentation, 0.51/0.40 with these defaults and 0.48/0.30 with 70%
    of utterances augmented down to 0 dB: the clean synthetic test splits reward clean training, real recordings
    reward robustness, and these settings buy the second at little cost to the first.
    """

    fraction: float = option(0.5, help="fraction of training utterances that are augmented (dev/test stay clean)")
    speed_prob: float = option(0.5, help="probability of speed perturbation for an augmented utterance")
    speed_range: list[float] = option([0.9, 1.1], help="speed factor range (Kaldi-style: tempo and pitch change)")
    reverb_prob: float = option(0.3, help="probability of reverberation with a synthetic room impulse response")
    rt60_range: list[float] = option([0.2, 0.8], help="reverberation time range in seconds (offices to halls)")
    telephone_prob: float = option(
        0.15, help="probability of a telephone channel: 300-3400 Hz band, 8 kHz sampling, 8-bit mu-law")
    noise_prob: float = option(0.5, help="probability of additive white/pink/brown noise")
    noise_snrs: list[float] = option([5.0, 10.0, 15.0, 20.0], help="SNRs (dB) that additive noise is drawn from")
    babble_prob: float = option(0.3, help="probability of babble made of other synthesized training utterances")
    babble_snrs: list[float] = option([10.0, 15.0, 20.0], help="SNRs (dB) that babble is drawn from")
    babble_talkers: list[int] = option([2, 6], help="inclusive range of the number of talkers in babble")

    def __post_init__(self) -> None:
        for name in ("fraction", "speed_prob", "reverb_prob", "telephone_prob", "noise_prob", "babble_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"augment.{name} must lie in [0, 1], got {value}")
        for name in ("speed_range", "rt60_range", "babble_talkers"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1] or lo_hi[0] <= 0:
                raise ConfigError(f"augment.{name} must be [low, high] with 0 < low <= high, got {lo_hi}")
        if not self.noise_snrs or not self.babble_snrs:
            raise ConfigError("augment.noise_snrs and augment.babble_snrs must not be empty")


def speed_perturb(x: np.ndarray, factor: float, sample_rate: int = 16000) -> np.ndarray:
    """Play ``x`` ``factor`` times faster, changing tempo and pitch together as Kaldi's speed perturbation does.

    Args:
        x: waveform ``(T,)``.
        factor: above 1 is faster (shorter).

    Returns:
        ``(round(T / factor),)`` float32.
    """
    if factor <= 0:
        raise ValueError(f"speed factor must be positive, got {factor}")
    # Reading the samples as if recorded at factor * rate and resampling back to rate shortens them by factor.
    y = soxr.resample(np.asarray(x, dtype=np.float32), sample_rate * factor, sample_rate)
    target = round(len(x) / factor)
    return _fit_length(y, target)


def _fit_length(y: np.ndarray, n: int) -> np.ndarray:
    """Crop or zero-pad ``y`` at the end to exactly ``n`` samples (resamplers round lengths differently)."""
    if len(y) >= n:
        return y[:n].astype(np.float32, copy=False)
    return np.pad(y, (0, n - len(y))).astype(np.float32, copy=False)


def _fft_length(n: int) -> int:
    """The next power of two (FFTs of arbitrary, e.g. prime, lengths are many times slower)."""
    return 1 << max(0, n - 1).bit_length()


def power(x: np.ndarray) -> float:
    """Mean power of a waveform."""
    return float(np.mean(np.square(x, dtype=np.float64))) if len(x) else 0.0


def colored_noise(n: int, color: str, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise of ``n`` samples with a white, pink or brown spectrum, normalised to unit power."""
    if color not in NOISE_COLORS:
        raise ValueError(f"unknown noise color {color!r}; known: {', '.join(NOISE_COLORS)}")
    m = _fft_length(n)  # FFTs of prime lengths are slow; the extra samples are cropped below
    spectrum = np.fft.rfft(rng.standard_normal(m))
    freqs = np.arange(len(spectrum), dtype=np.float64)
    freqs[0] = 1.0  # keep DC finite; it is removed below
    spectrum *= freqs ** (-NOISE_COLORS[color] / 2)  # amplitude ~ f^(-exponent/2)
    spectrum[0] = 0.0
    y = np.fft.irfft(spectrum, m)[:n]
    return (y / np.sqrt(max(power(y), 1e-20))).astype(np.float32)


def hum(n: int, rng: np.random.Generator, sample_rate: int = 16000) -> np.ndarray:
    """Mains hum (50 or 60 Hz and a few harmonics, random phases), normalised to unit power."""
    t = np.arange(n) / sample_rate
    base = rng.choice([50.0, 60.0])
    y = sum(
        rng.uniform(0.2, 1.0) / k * np.sin(2 * np.pi * base * k * t + rng.uniform(0, 2 * np.pi)) for k in range(1, 6)
    )
    y = np.asarray(y) + 0.05 * rng.standard_normal(n)
    return (y / np.sqrt(max(power(y), 1e-20))).astype(np.float32)


def babble(n: int, sources: Sequence[np.ndarray], talkers: int, rng: np.random.Generator) -> np.ndarray:
    """The sum of ``talkers`` random stretches of other speech, each at unit power; normalised to unit power.

    Args:
        n: output length in samples.
        sources: waveforms ``(T_i,)`` to draw from; short ones are looped.
        talkers: how many sources are mixed (drawn without replacement while there are enough).
    """
    if not sources:
        raise ValueError("babble needs at least one source utterance")
    picks = rng.choice(len(sources), size=talkers, replace=talkers > len(sources))
    mix = np.zeros(n, dtype=np.float64)
    for i in picks:
        src = np.asarray(sources[i], dtype=np.float64)
        reps = int(np.ceil((n + len(src)) / len(src)))
        looped = np.tile(src, reps)
        start = int(rng.integers(0, len(src)))
        seg = looped[start : start + n]
        mix += seg / np.sqrt(max(power(seg), 1e-20))
    return (mix / np.sqrt(max(power(mix), 1e-20))).astype(np.float32)


def add_noise(x: np.ndarray, noise: np.ndarray, snr_db: float, ref_power: float | None = None) -> np.ndarray:
    """``x`` plus ``noise`` scaled so that ``10 log10(ref_power / noise power) == snr_db``.

    Args:
        x: waveform ``(T,)``.
        noise: ``(T,)``.
        snr_db: the target signal-to-noise ratio.
        ref_power: the signal power the SNR refers to; by default that of ``x`` (pass the power of the speech
            alone when ``x`` is padded with silence).
    """
    if len(noise) != len(x):
        raise ValueError(f"noise has {len(noise)} samples, the signal {len(x)}")
    ref = power(x) if ref_power is None else ref_power
    noise_power = power(noise)
    if ref <= 0 or noise_power <= 0:
        return np.asarray(x, dtype=np.float32)
    scale = np.sqrt(ref / (noise_power * 10 ** (snr_db / 10)))
    return (x + scale * noise).astype(np.float32)


def synthetic_rir(rt60: float, rng: np.random.Generator, sample_rate: int = 16000) -> np.ndarray:
    """A room impulse response: a direct path, early reflections, then a diffuse tail of decaying noise.

    The tail falls by 60 dB in ``rt60`` seconds, starts after a 2-10 ms pre-delay, and carries a random
    direct-to-reverberant ratio between 0 and 10 dB. Exponentially decaying Gaussian noise is the standard
    statistical model of late reverberation. Before it, 3 to 8 discrete reflections (walls, desk, floor) arrive
    1-30 ms after the direct path, each weaker than it (0.2-0.7, following the tail's decay) and of random sign;
    they colour the spectrum (comb filtering) as the first bounces of a real room do.

    Returns:
        ``(L,)`` float32 with the direct path at index 0 equal to 1.
    """
    if rt60 <= 0:
        raise ValueError(f"rt60 must be positive, got {rt60}")
    length = int(rt60 * sample_rate)
    predelay = int(rng.uniform(0.002, 0.010) * sample_rate)
    t = np.arange(length - predelay) / sample_rate
    tail = rng.standard_normal(len(t)) * np.exp(-6.908 * t / rt60)  # ln(1000) = 6.908: -60 dB at t = rt60
    drr_db = rng.uniform(0.0, 10.0)
    tail *= np.sqrt(1.0 / (max(power(tail) * len(tail), 1e-20) * 10 ** (drr_db / 10)))  # energy ratio = DRR
    rir = np.zeros(length, dtype=np.float64)
    rir[0] = 1.0
    rir[predelay:] += tail
    n_early = int(rng.integers(3, 9))
    delays = rng.integers(int(0.001 * sample_rate), min(int(0.030 * sample_rate), length - 1) + 1, size=n_early)
    gains = rng.uniform(0.2, 0.7, size=n_early) * np.exp(-6.908 * delays / sample_rate / rt60)
    np.add.at(rir, delays, gains * rng.choice([-1.0, 1.0], size=n_early))
    return rir.astype(np.float32)


def reverberate(x: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """Convolve ``x`` with ``rir``, keep its length (the tail past the end is cut) and its power."""
    n = _fft_length(len(x) + len(rir) - 1)  # linear (not circular) convolution
    y = np.fft.irfft(np.fft.rfft(x, n) * np.fft.rfft(rir, n), n)[: len(x)]
    gain = np.sqrt(power(x) / max(power(y), 1e-20)) if power(x) > 0 else 1.0
    return (y * gain).astype(np.float32)


def _smooth_band(n_fft: int, low: float, high: float, sample_rate: int, width: float = 100.0) -> np.ndarray:
    """A band-pass gain over the ``n_fft // 2 + 1`` FFT bins: 1 inside [low, high], raised-cosine edges ``width``
    Hz wide outside it (a brick wall would ring), 0 beyond."""
    f = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    gain = np.ones_like(f)
    below, above = f < low, f > high
    gain[below] = 0.5 * (1 + np.cos(np.pi * np.minimum((low - f[below]) / width, 1.0)))
    gain[above] = 0.5 * (1 + np.cos(np.pi * np.minimum((f[above] - high) / width, 1.0)))
    return gain


def mu_law(x: np.ndarray, bits: int = 8, mu: float = 255.0) -> np.ndarray:
    """Companding as G.711 does it: encode ``x`` (in [-1, 1]) with mu-law to ``bits`` bits, then decode.

    Quiet samples keep fine steps and loud ones coarse steps, so the error grows with the level (about 38 dB SNR
    at 8 bits), the grainy sound of a phone line.
    """
    y = np.sign(x) * np.log1p(mu * np.minimum(np.abs(x), 1.0)) / np.log1p(mu)
    levels = 2 ** (bits - 1) - 1
    y = np.round(y * levels) / levels
    return (np.sign(y) * np.expm1(np.abs(y) * np.log1p(mu)) / mu).astype(np.float32)


def telephone(x: np.ndarray, rng: np.random.Generator, sample_rate: int = 16000) -> np.ndarray:
    """A narrow-band telephone channel: band-pass, 8 kHz sampling and 8-bit mu-law, back at ``sample_rate``.

    The band edges are drawn around the classic 300-3400 Hz (250-350 Hz and 3200-3600 Hz), since handsets and
    codecs differ. Before companding the peak is set to a drawn level (-12 to -3 dBFS), as a line's gain control
    would; the output keeps the input's power, so later SNRs and levels mean what they say.

    Args:
        x: waveform ``(T,)``.

    Returns:
        ``(T,)`` float32 with no energy outside the band (beyond the edges' 100 Hz roll-off).
    """
    x = np.asarray(x, dtype=np.float32)
    if not len(x) or power(x) == 0:
        return x
    low, high = rng.uniform(250.0, 350.0), rng.uniform(3200.0, 3600.0)
    n = _fft_length(len(x))
    band = np.fft.irfft(np.fft.rfft(x, n) * _smooth_band(n, low, high, sample_rate), n)[: len(x)]
    narrow = soxr.resample(band.astype(np.float32), sample_rate, 8000)
    peak = max(float(np.abs(narrow).max()), 1e-9)
    level = 10 ** (rng.uniform(-12.0, -3.0) / 20)
    narrow = mu_law(narrow * (level / peak)) * (peak / level)
    y = _fit_length(soxr.resample(narrow, 8000, sample_rate), len(x))
    # the upsampler's images above 4 kHz and the codec's noise outside the band are what a phone line removes too
    y = np.fft.irfft(np.fft.rfft(y, n) * _smooth_band(n, low, high, sample_rate), n)[: len(x)]
    return (y * np.sqrt(power(x) / max(power(y), 1e-20))).astype(np.float32)


def sample_augmentation(cfg: AugmentConfig, rng: np.random.Generator) -> dict[str, Any] | None:
    """Draw the augmentation of one training utterance: None (clean) or a dict of the effects and parameters.

    The dict is what the corpus metadata records, e.g. ``{"speed": 0.94, "noise": {"color": "pink", "snr_db":
    10.0}}``. An augmented utterance always gets at least one effect (noise, if none was drawn).
    """
    if rng.random() >= cfg.fraction:
        return None
    aug: dict[str, Any] = {}
    if rng.random() < cfg.speed_prob:
        aug["speed"] = round(float(rng.uniform(*cfg.speed_range)), 4)
    if rng.random() < cfg.reverb_prob:
        aug["reverb"] = {"rt60": round(float(rng.uniform(*cfg.rt60_range)), 3)}
    if rng.random() < cfg.telephone_prob:
        aug["telephone"] = True
    if rng.random() < cfg.babble_prob:
        lo, hi = cfg.babble_talkers
        aug["babble"] = {"talkers": int(rng.integers(lo, hi + 1)), "snr_db": float(rng.choice(cfg.babble_snrs))}
    if rng.random() < cfg.noise_prob or not aug:
        color = str(rng.choice([*NOISE_COLORS, "hum"]))
        aug["noise"] = {"color": color, "snr_db": float(rng.choice(cfg.noise_snrs))}
    return aug


def make_noise(kind: str, n: int, rng: np.random.Generator, sample_rate: int = 16000) -> np.ndarray:
    """Unit-power noise of one kind: a color of :data:`NOISE_COLORS` or ``"hum"``."""
    return hum(n, rng, sample_rate) if kind == "hum" else colored_noise(n, kind, rng)


def apply_additive(
    x: np.ndarray,
    aug: dict[str, Any] | None,
    rng: np.random.Generator,
    ref_power: float,
    babble_sources: Sequence[np.ndarray] = (),
    sample_rate: int = 16000,
) -> np.ndarray:
    """Add the noise and babble of ``aug`` (as drawn by :func:`sample_augmentation`) to the whole clip ``x``."""
    if not aug:
        return x
    if "babble" in aug:
        b = babble(len(x), babble_sources, aug["babble"]["talkers"], rng)
        x = add_noise(x, b, aug["babble"]["snr_db"], ref_power)
    if "noise" in aug:
        noise = make_noise(aug["noise"]["color"], len(x), rng, sample_rate)
        x = add_noise(x, noise, aug["noise"]["snr_db"], ref_power)
    return x
