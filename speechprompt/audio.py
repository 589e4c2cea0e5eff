"""Audio in: load, validate and resample waveforms, and compute Kaldi-style filterbank and MFCC features.

Everything here is plain numpy/soundfile/soxr/torch (no torchaudio). Waveforms are float32 mono in ``[-1, 1]`` at
16 kHz unless told otherwise. A file that cannot be used raises :class:`~speechprompt.errors.AudioError`, which
names the file and the problem, so that a batch job can report it and move on.

The features follow Kaldi's ``compute-fbank-feats``/``compute-mfcc-feats`` (as ``torchaudio.compliance.kaldi``
reimplements them, which is what fairseq's HuBERT and GSLM feature readers call), with dither 0 so that they are
deterministic::

    wav = load_audio("utt.flac")              # (T,) float32 at 16 kHz
    feats = mfcc(torch.from_numpy(wav))       # (1 + (T - 400) // 160, 39)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr
import torch
import torch.nn.functional as F
from torch import Tensor

from speechprompt.errors import AudioError

SAMPLE_RATE = 16000
# HuBERT's conv front end (kernel 10 stride 5, four of kernel 3 stride 2, two of kernel 2 stride 2) needs 400
# samples (25 ms at 16 kHz) to produce its first frame; a shorter input has no frame at all.
HUBERT_RECEPTIVE_FIELD = 400


# --------------------------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class AudioInfo:
    """What a file's header says, without decoding it.

    Attributes:
        path: the file.
        sample_rate: samples per second per channel.
        frames: samples per channel.
        channels: number of channels.
        format: container format as soundfile names it (``WAV``, ``FLAC``, ...).
        subtype: sample encoding (``PCM_16``, ``FLOAT``, ...).
    """

    path: str
    sample_rate: int
    frames: int
    channels: int
    format: str
    subtype: str

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def _check_exists(path: str | os.PathLike) -> None:
    if not os.path.exists(path):
        raise AudioError(path, "no such file")
    if os.path.isdir(path):
        raise AudioError(path, "is a directory, not an audio file")


def audio_info(path: str | os.PathLike) -> AudioInfo:
    """Read a file's header (sample rate, frames, channels) without decoding the samples.

    Raises:
        AudioError: the file is missing or is not audio that libsndfile can read.
    """
    _check_exists(path)
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioError(path, f"unreadable or corrupt audio ({_reason(e)})") from None
    return AudioInfo(str(path), int(info.samplerate), int(info.frames), int(info.channels), info.format,
                     info.subtype)


def _reason(e: BaseException) -> str:
    # libsndfile repeats the path in its message; keep only the part after it.
    text = str(e).strip()
    return text.split(": ", 1)[-1] if ": " in text else text


def resample(wav: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample a float waveform with soxr's high-quality (``HQ``) filter.

    Args:
        wav: (T,) or (T, channels) float array.
        orig_sr: its sample rate.
        target_sr: the wanted sample rate.

    Returns:
        float32 array of about ``T * target_sr / orig_sr`` samples (the same array, as float32, if the rates match).
    """
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    wav = np.asarray(wav, dtype=np.float32)
    if orig_sr == target_sr:
        return wav
    return soxr.resample(wav, orig_sr, target_sr, quality="HQ").astype(np.float32, copy=False)


def load_audio(path: str | os.PathLike, target_sr: int = SAMPLE_RATE, min_samples: int = HUBERT_RECEPTIVE_FIELD
               ) -> np.ndarray:
    """Read any file libsndfile reads as a float32 mono waveform at ``target_sr``, checking that it is usable.

    Channels are averaged; other sample rates are resampled with soxr (high quality).

    Args:
        path: the audio file.
        target_sr: sample rate of the result.
        min_samples: the fewest samples (after resampling) accepted. The default, 400, is the receptive field of
            HuBERT's conv front end: a shorter input gives no feature frame at all. Pass 0 to accept any length.

    Returns:
        (T,) float32 array.

    Raises:
        AudioError: the file is missing, unreadable or corrupt, empty, holds NaN/inf samples, is digital silence
            (every sample exactly 0), or is shorter than ``min_samples``.
    """
    _check_exists(path)
    if os.path.getsize(path) == 0:
        raise AudioError(path, "empty file (0 bytes)")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (T, C)
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as e:
        raise AudioError(path, f"unreadable or corrupt audio ({_reason(e)})") from None
    if data.size == 0:
        raise AudioError(path, "empty audio (0 samples)")
    if not np.isfinite(data).all():
        raise AudioError(path, f"{int((~np.isfinite(data)).sum())} samples are NaN or infinite")
    if not data.any():
        raise AudioError(path, "silent audio (every sample is exactly 0)")
    wav = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]  # (T,)
    wav = resample(wav, int(sr), target_sr)
    if len(wav) < min_samples:
        why = ", the receptive field of HuBERT's conv front end" if min_samples == HUBERT_RECEPTIVE_FIELD else ""
        raise AudioError(path, f"too short: {len(wav)} samples at {target_sr} Hz, fewer than {min_samples} "
                               f"({1000 * min_samples / target_sr:g} ms{why})")
    return np.ascontiguousarray(wav, dtype=np.float32)


# --------------------------------------------------------------------------------------------------------------
# Kaldi-style features


def kaldi_mel(freq: Tensor | float) -> Tensor | float:
    """Kaldi's mel scale, ``1127 ln(1 + f / 700)``."""
    if isinstance(freq, Tensor):
        return 1127.0 * torch.log1p(freq / 700.0)
    return 1127.0 * math.log1p(freq / 700.0)


def mel_banks(n_mels: int, n_fft: int, sample_rate: int, low_freq: float = 20.0, high_freq: float = 0.0,
              dtype: torch.dtype = torch.float32) -> Tensor:
    """Kaldi's triangular mel filters, triangles in the mel domain.

    Args:
        n_mels: number of filters.
        n_fft: FFT size (the padded frame length).
        sample_rate: sample rate in Hz.
        low_freq: lower edge of the first filter, Hz.
        high_freq: upper edge of the last filter, Hz; ``<= 0`` means that much below Nyquist (Kaldi's convention).

    Returns:
        (n_mels, n_fft // 2 + 1) weights. The Nyquist bin's column is zero, as in Kaldi.
    """
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not 0.0 <= low_freq < high_freq <= nyquist:
        raise ValueError(f"need 0 <= low_freq < high_freq <= Nyquist, got {low_freq}, {high_freq}, {nyquist}")
    mel_low, mel_high = kaldi_mel(low_freq), kaldi_mel(high_freq)
    delta = (mel_high - mel_low) / (n_mels + 1)
    bins = torch.arange(n_mels, dtype=torch.float64)[:, None]  # (M, 1)
    left = mel_low + bins * delta
    center = left + delta
    right = center + delta
    # Kaldi covers bins 0 .. n_fft/2 - 1; the Nyquist bin gets no weight.
    freqs = torch.arange(n_fft // 2, dtype=torch.float64) * (sample_rate / n_fft)
    mel = kaldi_mel(freqs)[None, :]  # (1, n_fft // 2)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    weights = torch.clamp(torch.minimum(up, down), min=0.0)  # (M, n_fft // 2)
    return F.pad(weights, (0, 1)).to(dtype)


def povey_window(length: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Kaldi's default window: a symmetric Hann window raised to the power 0.85."""
    return torch.hann_window(length, periodic=False, dtype=torch.float64).pow(0.85).to(dtype)


def hanning_window(length: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Kaldi's ``hanning`` window: a symmetric Hann window."""
    return torch.hann_window(length, periodic=False, dtype=torch.float64).to(dtype)


_WINDOWS = {"povey": povey_window, "hanning": hanning_window}


def _frames(wav: Tensor, frame_length: int, frame_shift: int) -> Tensor:
    """Kaldi framing with ``snip_edges=True``: only whole frames, ``1 + (T - frame_length) // frame_shift``."""
    if wav.shape[-1] < frame_length:
        return wav.new_zeros(0, frame_length)
    return wav.unfold(0, frame_length, frame_shift)  # (N, L)


def _as_waveform(wav: Tensor | np.ndarray) -> Tensor:
    x = torch.as_tensor(wav)
    if x.dim() != 1:
        raise ValueError(f"expected a mono (T,) waveform, got shape {tuple(x.shape)}")
    # Integer samples and half precision both lose the small differences the log takes.
    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def fbank(
    wav: Tensor | np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    n_mels: int = 80,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    preemphasis: float = 0.97,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
    window: str = "povey",
) -> Tensor:
    """Kaldi log mel filterbank energies.

    Per frame, as Kaldi's defaults: remove the DC offset, pre-emphasise (``x[i] -= 0.97 x[i-1]``, the first sample
    against itself), apply the povey window, zero-pad to the next power of two, take the power spectrum, apply
    triangular mel filters (:func:`mel_banks`) and take the log with a floor of float32's machine epsilon.

    Differences from Kaldi: no dither (Kaldi's command-line default is 1.0; torchaudio's and fairseq's is 0), and
    the samples are used as given (Kaldi reads int16 values, so its log energies are offset by ``2 ln 32768``).
    Frames are cut by hand rather than with ``torch.stft``, because DC removal and pre-emphasis act on each frame
    between framing and windowing.

    Args:
        wav: (T,) waveform. float64 input is computed in float64, anything else in float32.
        sample_rate: Hz.
        n_mels: number of mel filters.
        frame_length_ms: window length (25 ms = 400 samples at 16 kHz).
        frame_shift_ms: hop (10 ms = 160 samples).
        preemphasis: pre-emphasis coefficient.
        low_freq: lower edge of the mel filters, Hz.
        high_freq: upper edge, Hz; ``<= 0`` is an offset below Nyquist.
        window: ``povey`` (Kaldi's default) or ``hanning`` (a symmetric Hann window, what AST's front end uses).

    Returns:
        (frames, n_mels) with ``frames = 1 + (T - frame_length) // frame_shift`` (0 if T is shorter than a frame).
    """
    if window not in _WINDOWS:
        raise ValueError(f"window {window!r} is not one of {sorted(_WINDOWS)}")
    x = _as_waveform(wav)
    frame_length = int(sample_rate * frame_length_ms / 1000)
    frame_shift = int(sample_rate * frame_shift_ms / 1000)
    n_fft = 1 << (frame_length - 1).bit_length()  # 400 -> 512
    frames = _frames(x, frame_length, frame_shift)  # (N, L)
    if frames.shape[0] == 0:  # MKL's FFT refuses an empty batch
        return x.new_zeros(0, n_mels)
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)  # (N, L): x[i-1], x[0] for i = 0
    frames = frames - preemphasis * previous
    frames = frames * _WINDOWS[window](frame_length, x.dtype)
    power = torch.fft.rfft(frames, n=n_fft).abs().pow(2)  # (N, n_fft // 2 + 1)
    banks = mel_banks(n_mels, n_fft, sample_rate, low_freq, high_freq, x.dtype)  # (M, n_fft // 2 + 1)
    energies = power @ banks.T  # (N, M)
    return energies.clamp(min=torch.finfo(torch.float32).eps).log()


def log_mel(wav: Tensor | np.ndarray, sample_rate: int = SAMPLE_RATE, n_mels: int = 80) -> Tensor:
    """The embedded default's log-mel features: :func:`fbank` with Kaldi's defaults, (frames, n_mels)."""
    return fbank(wav, sample_rate=sample_rate, n_mels=n_mels)


def dct_matrix(n_mels: int, n_ceps: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Orthonormal DCT-II, ``(n_mels, n_ceps)``: ``cepstra = log_mel @ dct_matrix(...)``."""
    n = torch.arange(n_mels, dtype=torch.float64)[:, None] + 0.5  # (M, 1)
    k = torch.arange(n_ceps, dtype=torch.float64)[None, :]  # (1, C)
    basis = torch.cos(math.pi / n_mels * n * k) * math.sqrt(2.0 / n_mels)
    basis[:, 0] = math.sqrt(1.0 / n_mels)
    return basis.to(dtype)


def compute_deltas(feats: Tensor, win_length: int = 5) -> Tensor:
    """Kaldi/torchaudio regression deltas along time, edges padded by repeating the first/last frame.

    ``d[t] = sum_{k=1..n} k (c[t+k] - c[t-k]) / (2 sum_{k=1..n} k^2)`` with ``n = (win_length - 1) // 2``.

    Args:
        feats: (frames, D).

    Returns:
        (frames, D).
    """
    if win_length < 3:
        raise ValueError(f"win_length must be at least 3, got {win_length}")
    n = (win_length - 1) // 2
    denom = n * (n + 1) * (2 * n + 1) / 3
    if feats.shape[0] == 0:
        return feats.clone()
    x = feats.T[:, None, :]  # (D, 1, frames)
    x = F.pad(x, (n, n), mode="replicate")
    kernel = torch.arange(-n, n + 1, dtype=feats.dtype, device=feats.device).view(1, 1, -1)
    return (F.conv1d(x, kernel) / denom)[:, 0, :].T  # (frames, D)


def mfcc(
    wav: Tensor | np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    n_mfcc: int = 13,
    deltas: bool = True,
    n_mels: int = 23,
    cepstral_lifter: float = 22.0,
) -> Tensor:
    """Kaldi MFCCs (``use_energy=False``), optionally with deltas and delta-deltas as HuBERT's and GSLM's readers.

    The log filterbank of :func:`fbank` (Kaldi's 23 mel bins by default) goes through an orthonormal DCT-II, keeps
    ``n_mfcc`` coefficients and multiplies coefficient ``i`` by Kaldi's lifter ``1 + (Q / 2) sin(pi i / Q)``.
    With ``deltas``, :func:`compute_deltas` is applied twice and ``[c, d, dd]`` are concatenated along features.

    Args:
        wav: (T,) waveform.
        sample_rate: Hz.
        n_mfcc: cepstra kept (Kaldi's ``num_ceps``).
        deltas: append deltas and delta-deltas.
        n_mels: mel filters before the DCT (Kaldi's ``num_mel_bins``).
        cepstral_lifter: Q above; 0 disables liftering.

    Returns:
        (frames, n_mfcc) or (frames, 3 * n_mfcc) with deltas.
    """
    if n_mfcc > n_mels:
        raise ValueError(f"n_mfcc ({n_mfcc}) cannot exceed n_mels ({n_mels})")
    logmel = fbank(wav, sample_rate=sample_rate, n_mels=n_mels)  # (N, n_mels)
    ceps = logmel @ dct_matrix(n_mels, n_mfcc, logmel.dtype)  # (N, n_mfcc)
    if cepstral_lifter:
        i = torch.arange(n_mfcc, dtype=torch.float64)
        lifter = 1.0 + 0.5 * cepstral_lifter * torch.sin(math.pi * i / cepstral_lifter)
        ceps = ceps * lifter.to(ceps.dtype)
    if not deltas:
        return ceps
    d = compute_deltas(ceps)
    dd = compute_deltas(d)
    return torch.cat([ceps, d, dd], dim=1)  # (N, 3 * n_mfcc)
