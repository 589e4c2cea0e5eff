"""Tests for speechprompt.audio: loading/validation on tiny generated files, and features against numpy formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from speechprompt.audio import (
    audio_info,
    compute_deltas,
    fbank,
    load_audio,
    log_mel,
    mfcc,
    resample,
)
from speechprompt.errors import AudioError, SpeechPromptError


def _tone(sr: int, seconds: float = 0.25, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _write(path, data, sr, subtype=None):
    sf.write(str(path), data, sr, subtype=subtype)
    return path


# ---------------------------------------------------------------------------------------------------------------
# load_audio


def test_load_audio_16k_mono_roundtrip(tmp_path):
    wav = _tone(16000)
    path = _write(tmp_path / "a.wav", wav, 16000, subtype="FLOAT")
    out = load_audio(path)
    assert out.dtype == np.float32 and out.shape == wav.shape
    np.testing.assert_array_equal(out, wav)


def test_load_audio_stereo_is_averaged(tmp_path):
    left, right = _tone(16000, freq=300), _tone(16000, freq=500)
    path = _write(tmp_path / "s.wav", np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    out = load_audio(path)
    assert out.ndim == 1
    np.testing.assert_allclose(out, (left + right) / 2, atol=1e-7)


@pytest.mark.parametrize("sr", [8000, 44100])
def test_load_audio_resamples_to_16k(tmp_path, sr):
    path = _write(tmp_path / f"r{sr}.flac", _tone(sr, seconds=0.5), sr)
    out = load_audio(path)
    assert abs(len(out) - 8000) <= 1
    # The tone survives resampling: its spectrum peaks at 440 Hz.
    spectrum = np.abs(np.fft.rfft(out))
    peak_hz = np.argmax(spectrum) * 16000 / len(out)
    assert abs(peak_hz - 440) < 4
    # Away from the edges the waveform matches the ideal 16 kHz tone.
    ideal = _tone(16000, seconds=0.5)
    np.testing.assert_allclose(out[400:-400], ideal[400:-400], atol=2e-2)


def test_resample_identity_and_length():
    x = _tone(22050)
    np.testing.assert_array_equal(resample(x, 22050, 22050), x)
    assert len(resample(x, 22050, 16000)) == round(len(x) * 16000 / 22050)


def test_load_audio_missing_file(tmp_path):
    with pytest.raises(AudioError, match="no such file"):
        load_audio(tmp_path / "nope.wav")


def test_load_audio_corrupt_bytes(tmp_path):
    path = tmp_path / "bad.wav"
    path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEgarbage" + bytes(range(256)))
    with pytest.raises(AudioError, match="unreadable or corrupt") as e:
        load_audio(path)
    assert e.value.path == str(path)
    assert isinstance(e.value, SpeechPromptError)


def test_load_audio_empty_file(tmp_path):
    path = _write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="empty"):
        load_audio(path)


def test_load_audio_zero_byte_file(tmp_path):
    path = tmp_path / "zero.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match="empty file"):
        load_audio(path)


def test_load_audio_nan(tmp_path):
    wav = _tone(16000)
    wav[100] = np.nan
    path = _write(tmp_path / "nan.wav", wav, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN or infinite"):
        load_audio(path)


def test_load_audio_silent(tmp_path):
    path = _write(tmp_path / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="silent"):
        load_audio(path)


def test_load_audio_too_short_mentions_receptive_field(tmp_path):
    path = _write(tmp_path / "short.wav", _tone(16000)[:399], 16000)
    with pytest.raises(AudioError, match="too short: 399 samples.*receptive field"):
        load_audio(path)
    assert len(load_audio(path, min_samples=0)) == 399
    # Length is judged after resampling: 8 kHz * 300 samples -> 600 samples at 16 kHz.
    path8 = _write(tmp_path / "short8k.wav", _tone(8000)[:300], 8000)
    assert abs(len(load_audio(path8)) - 600) <= 1


def test_audio_info(tmp_path):
    path = _write(tmp_path / "i.flac", np.zeros((4410, 2), dtype=np.float32) + 0.1, 44100)
    info = audio_info(path)
    assert (info.sample_rate, info.frames, info.channels, info.format) == (44100, 4410, 2, "FLAC")
    assert info.duration == pytest.approx(0.1)
    with pytest.raises(AudioError):
        audio_info(tmp_path / "missing.wav")


# ---------------------------------------------------------------------------------------------------------------
# Features: an independent numpy implementation of Kaldi's formulas (float64)


def _np_mel(f):
    return 1127.0 * np.log(1.0 + f / 700.0)


def _np_fbank(x: np.ndarray, sr: int = 16000, n_mels: int = 80) -> np.ndarray:
    flen, shift, nfft = int(0.025 * sr), int(0.010 * sr), 512
    n = 1 + (len(x) - flen) // shift
    out = np.zeros((n, n_mels))
    # Filters: triangles in mel between 20 Hz and Nyquist, evaluated at FFT bin centres 0..nfft/2-1.
    mlo, mhi = _np_mel(20.0), _np_mel(sr / 2)
    d = (mhi - mlo) / (n_mels + 1)
    bank = np.zeros((n_mels, nfft // 2 + 1))
    for m in range(n_mels):
        lo, c, hi = mlo + m * d, mlo + (m + 1) * d, mlo + (m + 2) * d
        for k in range(nfft // 2):
            mk = _np_mel(k * sr / nfft)
            if lo < mk < hi:
                bank[m, k] = (mk - lo) / (c - lo) if mk <= c else (hi - mk) / (hi - c)
    win = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(flen) / (flen - 1))) ** 0.85
    for i in range(n):
        fr = x[i * shift : i * shift + flen].astype(np.float64)
        fr = fr - fr.mean()
        fr = np.concatenate([[fr[0] * (1 - 0.97)], fr[1:] - 0.97 * fr[:-1]])
        spec = np.abs(np.fft.rfft(fr * win, n=nfft)) ** 2
        out[i] = np.log(np.maximum(bank @ spec, np.finfo(np.float32).eps))
    return out


def _np_mfcc(x: np.ndarray, n_mfcc: int = 13, n_mels: int = 23) -> np.ndarray:
    logmel = _np_fbank(x, n_mels=n_mels)
    ceps = np.zeros((len(logmel), n_mfcc))
    for k in range(n_mfcc):
        scale = math.sqrt(1 / n_mels) if k == 0 else math.sqrt(2 / n_mels)
        basis = scale * np.cos(np.pi * k * (np.arange(n_mels) + 0.5) / n_mels)
        ceps[:, k] = logmel @ basis
    return ceps * (1 + 11 * np.sin(np.pi * np.arange(n_mfcc) / 22))


def _np_deltas(c: np.ndarray) -> np.ndarray:
    p = np.concatenate([c[:1], c[:1], c, c[-1:], c[-1:]])
    return np.stack([(p[t + 3] - p[t + 1] + 2 * (p[t + 4] - p[t])) / 10 for t in range(len(c))])


@pytest.fixture(scope="module")
def speechlike() -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(5000) / 16000
    x = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.standard_normal(5000)
    return x + 0.01  # a DC offset, which Kaldi removes per frame


@pytest.mark.parametrize("length,frames", [(399, 0), (400, 1), (559, 1), (560, 2), (16000, 98), (5000, 29)])
def test_frame_count_snip_edges(length, frames):
    x = torch.randn(length)
    assert fbank(x).shape == (frames, 80)
    assert mfcc(x).shape == (frames, 39)
    assert mfcc(x, deltas=False).shape == (frames, 13)


def test_fbank_matches_numpy_reference(speechlike):
    ref = _np_fbank(speechlike)
    np.testing.assert_allclose(fbank(torch.from_numpy(speechlike)).numpy(), ref, rtol=0, atol=1e-9)
    out32 = log_mel(torch.from_numpy(speechlike).float())
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), ref, atol=2e-3)


def test_fbank_other_sizes(speechlike):
    np.testing.assert_allclose(fbank(speechlike, n_mels=23).numpy(), _np_fbank(speechlike, n_mels=23), atol=1e-9)


def test_mfcc_matches_numpy_reference(speechlike):
    ref = _np_mfcc(speechlike)
    out = mfcc(torch.from_numpy(speechlike), deltas=True).numpy()
    np.testing.assert_allclose(out[:, :13], ref, atol=1e-8)
    d = _np_deltas(ref)
    np.testing.assert_allclose(out[:, 13:26], d, atol=1e-8)
    np.testing.assert_allclose(out[:, 26:], _np_deltas(d), atol=1e-8)


def test_compute_deltas_linear_ramp():
    # On a linear ramp the regression slope is exact away from the edges; the edges see replicated frames.
    ramp = torch.arange(10, dtype=torch.float64)[:, None] * torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    d = compute_deltas(ramp)
    assert d.shape == (10, 2)
    torch.testing.assert_close(d[2:-2], torch.tensor([[1.0, -2.0]], dtype=torch.float64).expand(6, 2))
    assert d[0, 0].item() == pytest.approx((0 * 1 + 1 * 1 + 2 * 2 - 0 - 0) / 10)


def test_features_reject_non_mono():
    with pytest.raises(ValueError, match="mono"):
        fbank(torch.zeros(2, 1000))
