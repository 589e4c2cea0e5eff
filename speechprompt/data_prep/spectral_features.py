"""The spectral feature readers: Kaldi-style MFCCs (with deltas, optionally mean-normalised) and log-mel
filterbanks at 100 Hz, as GSLM's readers. They take no model, and read one utterance at a time."""

from __future__ import annotations

from typing import Any

import torch

from speechprompt.audio import SAMPLE_RATE, log_mel, mfcc
from speechprompt.data_prep.feature_reader import FeatureError, FeatureReader


def _no_model_options(name: str, checkpoint: str | None, layer: int | None) -> None:
    if checkpoint is not None or layer is not None:
        raise FeatureError(f"--checkpoint and --layer are for the hubert/ssl reader; the {name} reader takes "
                           "neither")

class MfccFeatureReader(FeatureReader):
    """13 Kaldi-style MFCCs plus deltas and delta-deltas (39-d) at 100 Hz, as GSLM/HuBERT's MFCC reader."""

    frame_rate = 100.0

    def __init__(self, n_mfcc: int = 13, deltas: bool = True) -> None:
        self.n_mfcc = n_mfcc
        self.deltas = deltas
        self.dim = n_mfcc * (3 if deltas else 1)

    @classmethod
    def from_options(cls, checkpoint: str | None, layer: int | None, device: str) -> MfccFeatureReader:
        _no_model_options("mfcc", checkpoint, layer)
        return cls()

    def _read(self, wav: torch.Tensor) -> torch.Tensor:
        return mfcc(wav, sample_rate=SAMPLE_RATE, n_mfcc=self.n_mfcc, deltas=self.deltas).float()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "n_mfcc": self.n_mfcc, "deltas": self.deltas}


class MfccCmnFeatureReader(MfccFeatureReader):
    """The 39-d MFCCs of :class:`MfccFeatureReader` minus their per-utterance mean (cepstral mean normalisation).

    A fixed channel or loudness (a microphone, a synthesizer's gain and spectral tilt) adds a constant to every
    frame's cepstrum; removing the utterance mean removes it, so k-means spends fewer units on who or what is
    speaking. On the demo's corpus, units of this reader raise a bag-of-units classifier on the held-out
    synthesizer from 0.34 to 0.48. Not GSLM's reader (fairseq's MFCC dump has no normalisation): ``mfcc`` is that.
    """

    @classmethod
    def from_options(cls, checkpoint: str | None, layer: int | None, device: str) -> MfccCmnFeatureReader:
        _no_model_options("mfcc_cmn", checkpoint, layer)
        return cls()

    def _read(self, wav: torch.Tensor) -> torch.Tensor:
        x = super()._read(wav)  # (frames, 39)
        return x - x.mean(dim=0, keepdim=True)


class LogMelFeatureReader(FeatureReader):
    """80 log-mel filterbank energies (25 ms window, 10 ms hop) at 100 Hz, as GSLM's log-mel reader."""

    frame_rate = 100.0

    def __init__(self, n_mels: int = 80) -> None:
        self.n_mels = n_mels
        self.dim = n_mels

    @classmethod
    def from_options(cls, checkpoint: str | None, layer: int | None, device: str) -> LogMelFeatureReader:
        _no_model_options("logmel", checkpoint, layer)
        return cls()

    def _read(self, wav: torch.Tensor) -> torch.Tensor:
        return log_mel(wav, sample_rate=SAMPLE_RATE, n_mels=self.n_mels).float()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "n_mels": self.n_mels}
