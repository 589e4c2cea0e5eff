"""The feature reader interface: :class:`FeatureReader` (a waveform in, a ``(frames, D)`` matrix out), its error, the
compute types a reader may run in, and what identifies a reader's features (:func:`feature_mismatch`).

The readers themselves are in :mod:`.encoder_features` and :mod:`.spectral_features`, batched reading in
:mod:`.feature_batches`; :mod:`.features` registers the readers by name and re-exports all of it.
"""

from __future__ import annotations

import abc
import hashlib
import os
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from speechprompt.audio import SAMPLE_RATE
from speechprompt.errors import SpeechPromptError


class FeatureError(SpeechPromptError):
    """A feature reader that cannot be built as asked, or features that do not fit what they are used with."""


class FeatureReader(abc.ABC):
    """Turns a 16 kHz mono float waveform into features.

    Attributes:
        name: the registry name.
        dim: the feature dimension D.
        frame_rate: frames per second of audio.
    """

    name: ClassVar[str]
    frame_rate: float  # a class attribute, or set per instance (an encoder's conv stack decides it)
    dim: int
    # True for readers whose frames are one-hot symbols (phones): their quantizer is the identity, not a k-means.
    discrete: ClassVar[bool] = False

    @classmethod
    @abc.abstractmethod
    def from_options(cls, checkpoint: str | None, layer: int | None, device: str) -> FeatureReader:
        """Build the reader from the command-line options (each reader says which it needs)."""

    @abc.abstractmethod
    def _read(self, wav: torch.Tensor) -> torch.Tensor:
        """(T,) float32 -> (frames, D)."""

    def read(self, wav: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Features of one utterance.

        Args:
            wav: (T,) float waveform at 16 kHz.

        Returns:
            (frames, D) float32 tensor (on the reader's device).
        """
        x = self._waveform(wav)
        with torch.inference_mode():
            return self._read(x)

    def read_batch(self, wavs: Sequence[np.ndarray | torch.Tensor]) -> list[torch.Tensor]:
        """Features of several utterances: element i is what :meth:`read` gives ``wavs[i]``.

        This base class reads them one at a time (the spectral readers gain nothing from a batch); encoder readers
        run them as one padded forward. Pass utterances of similar lengths (:func:`read_files` sorts them) so that
        little of the batch is padding.

        Args:
            wavs: (T_i,) float waveforms at 16 kHz.

        Returns:
            One (frames_i, D) float32 tensor per waveform.
        """
        return [self.read(w) for w in wavs]

    def _waveform(self, wav: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(wav) if not isinstance(wav, torch.Tensor) else wav, dtype=torch.float32)
        if x.dim() != 1:
            raise FeatureError(f"{self.name} reader expects a mono (T,) waveform, got shape {tuple(x.shape)}")
        return x

    def set_dtype(self, dtype: str) -> None:
        """Compute in ``dtype`` (``float32`` or ``bfloat16``). Features are float32 either way. Only readers that run
        a network support bfloat16; the others refuse it with a :class:`FeatureError`."""
        if DTYPES.get(dtype) is not torch.float32:
            raise FeatureError(f"--dtype {dtype}: the {self.name} reader computes in float32 only (bf16 is for the "
                               "hubert/ssl encoder readers)")

    def describe(self) -> dict[str, Any]:
        """What identifies these features: compared by :func:`feature_mismatch`, stored with quantizers."""
        return {"name": self.name, "dim": self.dim, "frame_rate": self.frame_rate, "sample_rate": SAMPLE_RATE}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """``sha256:<hex>`` of a file's bytes: the same digest ``sha256sum`` prints, so users can check it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return f"sha256:{h.hexdigest()}"


# Keys that identify the features. A checkpoint's path is not one of them: the same file may move.
_IDENTITY_KEYS = ("name", "dim", "layer", "fingerprint", "n_mels", "n_mfcc", "deltas", "normalize", "sample_rate")


def feature_mismatch(expected: dict[str, Any], actual: dict[str, Any]) -> str | None:
    """A sentence naming what differs between two reader descriptions, or ``None`` if they are the same."""
    diffs = [
        f"{key} {expected.get(key)!r} vs {actual.get(key)!r}"
        for key in _IDENTITY_KEYS
        if (key in expected or key in actual) and expected.get(key) != actual.get(key)
    ]
    return "; ".join(diffs) or None
