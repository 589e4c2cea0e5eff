"""Feature readers: a waveform in, a ``(frames, D)`` feature matrix out.

Readers are chosen by name through a small registry, so that a new one is one class and one
:func:`register_feature_reader` call, not another branch in every script::

    reader = build_feature_reader("hubert", checkpoint="hubert_base_ls960.pt", layer=6)
    feats = reader.read(wav)  # (frames, 768) at 50 Hz

``hubert`` (and its general name ``ssl``) reads a layer of any frame-level encoder that
:func:`~speechprompt.models.encoders.load_encoder` loads: fairseq HuBERT/wav2vec 2.0/data2vec checkpoints (CTC
fine-tuned ones too), official WavLM files, and Hugging Face directories.

Every reader can :meth:`~FeatureReader.describe` itself (name, dimension, layer, checkpoint and its sha256). A
quantizer stores that description when it is learned, and ``speechprompt prepare`` refuses features that do not
match it: units from the wrong layer or checkpoint are silently meaningless otherwise.
"""

from __future__ import annotations

import abc
import argparse
import hashlib
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from speechprompt.audio import SAMPLE_RATE, log_mel, mfcc
from speechprompt.errors import SpeechPromptError
from speechprompt.models.encoders import load_encoder
from speechprompt.models.wav2vec2 import Wav2Vec2Model, normalize_waveform


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
        x = torch.as_tensor(np.asarray(wav) if not isinstance(wav, torch.Tensor) else wav, dtype=torch.float32)
        if x.dim() != 1:
            raise FeatureError(f"{self.name} reader expects a mono (T,) waveform, got shape {tuple(x.shape)}")
        with torch.inference_mode():
            return self._read(x)

    def describe(self) -> dict[str, Any]:
        """What identifies these features: compared by :func:`feature_mismatch`, stored with quantizers."""
        return {"name": self.name, "dim": self.dim, "frame_rate": self.frame_rate, "sample_rate": SAMPLE_RATE}


_READERS: dict[str, type[FeatureReader]] = {}


def register_feature_reader(name: str, cls: type[FeatureReader]) -> type[FeatureReader]:
    """Make ``cls`` available as ``--features name``."""
    if name in _READERS and _READERS[name] is not cls:
        raise ValueError(f"feature reader {name!r} is already registered ({_READERS[name].__name__})")
    cls.name = name
    _READERS[name] = cls
    return cls


def feature_reader_names() -> list[str]:
    return list(_READERS)


def build_feature_reader(
    name: str, checkpoint: str | os.PathLike | None = None, layer: int | None = None, device: str = "cpu"
) -> FeatureReader:
    """The registered reader ``name``, built from the options it takes."""
    if name not in _READERS:
        raise FeatureError(f"unknown feature reader {name!r}; choose from {', '.join(_READERS)}")
    return _READERS[name].from_options(str(checkpoint) if checkpoint is not None else None, layer, device)


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


def _no_model_options(name: str, checkpoint: str | None, layer: int | None) -> None:
    if checkpoint is not None or layer is not None:
        raise FeatureError(f"--checkpoint and --layer are for the hubert/ssl reader; the {name} reader takes "
                           "neither")


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a checkpoint file, or of a Hugging Face directory's ``config.json`` and weight files
    (in name order: a sharded model is one fingerprint)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    names = ["config.json"] + sorted(p.name for p in path.iterdir()
                                     if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json"))
    for name in names:
        h.update(name.encode() + b"\0" + bytes.fromhex(file_sha256(path / name).split(":")[1]))
    return f"sha256:{h.hexdigest()}"


class HubertFeatureReader(FeatureReader):
    """Layer ``layer`` (1-based, fairseq's ``output_layer``) of a speech encoder checkpoint: HuBERT (50 Hz, or 25 Hz
    for mHuBERT-25Hz), wav2vec 2.0, data2vec-audio, WavLM, from fairseq, WavLM or Hugging Face files.

    Matches fairseq's GSLM ``HubertFeatureReader``: the whole waveform is normalised iff the checkpoint says so
    (fairseq's task ``normalize``, HF's ``do_normalize``); then it is cut into chunks of at most ``max_chunk``
    samples, each chunk is encoded on its own (no padding mask) and the frames are concatenated. One difference: a
    last chunk shorter than the conv front end's receptive field (400 samples) gives no frame here, where fairseq
    fails in the conv.
    """

    frame_rate = 50.0
    max_chunk = 1_600_000

    def __init__(
        self,
        model: Wav2Vec2Model,
        task_cfg: dict[str, Any],
        layer: int,
        device: str = "cpu",
        checkpoint: str | None = None,
        fingerprint: str | None = None,
    ) -> None:
        if getattr(model, "frame_rate", None) is None:
            raise FeatureError(f"{checkpoint or 'the model'} is a {getattr(model, 'architecture', '?')} model: its "
                               "tokens are patches of a fixed-length spectrogram, not frames in time; units need a "
                               "frame-level encoder (wav2vec2, hubert, data2vec-audio, wavlm)")
        self.frame_rate = float(model.frame_rate)
        if not 1 <= layer <= model.num_layers:
            raise FeatureError(f"--layer {layer} is out of range: {checkpoint or 'the model'} has layers "
                               f"1..{model.num_layers}")
        self.model = model.eval().to(device)
        self.task_cfg = task_cfg
        self.layer = int(layer)
        self.device = device
        self.dim = model.encoder_embed_dim
        self.checkpoint = checkpoint
        self.fingerprint = fingerprint

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, layer: int, device: str = "cpu") -> HubertFeatureReader:
        """Load an encoder with :func:`load_encoder` (safely, without fairseq or transformers) and fingerprint it."""
        path = Path(checkpoint)
        if not path.exists():
            raise FeatureError(f"encoder checkpoint {checkpoint} does not exist")
        enc = load_encoder(path)
        enc.model.remove_pretraining_modules()  # never used for features
        return cls(enc.model, enc.task_cfg, layer, device, checkpoint=str(path.resolve()),
                   fingerprint=checkpoint_fingerprint(path))

    @classmethod
    def from_options(cls, checkpoint: str | None, layer: int | None, device: str) -> HubertFeatureReader:
        if checkpoint is None or layer is None:
            raise FeatureError(f"the {cls.name} reader needs --checkpoint (a fairseq/WavLM .pt or a Hugging Face "
                               "directory) and --layer (1-based)")
        return cls.from_checkpoint(checkpoint, layer, device)

    def _read(self, wav: torch.Tensor) -> torch.Tensor:
        dtype = self.model.layer_norm.weight.dtype  # a model held in bf16 computes in bf16; features stay fp32
        x = normalize_waveform(wav.to(self.device), self.task_cfg).view(1, -1).to(dtype)  # (1, T)
        feats = []
        for start in range(0, x.size(1), self.max_chunk):
            chunk = x[:, start : start + self.max_chunk]
            if chunk.size(1) < self.model.receptive_field:
                continue
            feats.append(self.model.extract_features(chunk, padding_mask=None, output_layer=self.layer))  # (1, F, D)
        if not feats:
            return x.new_zeros(0, self.dim, dtype=torch.float32)
        return torch.cat(feats, dim=1).squeeze(0).float()  # (frames, D)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "layer": self.layer,
            "checkpoint": self.checkpoint,
            "fingerprint": self.fingerprint,
            "normalize": bool(self.task_cfg.get("normalize", False)),
            "max_chunk": self.max_chunk,
            "architecture": getattr(self.model, "architecture", "hubert"),
        }


class SslFeatureReader(HubertFeatureReader):
    """The same reader under a name that does not say HuBERT: ``--features ssl`` for any supported encoder."""


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


register_feature_reader("hubert", HubertFeatureReader)
register_feature_reader("ssl", SslFeatureReader)
register_feature_reader("mfcc", MfccFeatureReader)
register_feature_reader("mfcc_cmn", MfccCmnFeatureReader)
register_feature_reader("logmel", LogMelFeatureReader)


def add_feature_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The options that choose a feature reader, shared by ``kmeans`` and ``prepare``."""
    parser.add_argument("--features", required=required, choices=feature_reader_names(),
                        help="feature reader: hubert or ssl (a layer of a HuBERT, wav2vec 2.0, data2vec-audio or WavLM "
                        "checkpoint, 50 Hz), mfcc (39-d, 100 Hz), mfcc_cmn (mfcc minus its per-utterance mean) or "
                        "logmel (80-d, 100 Hz)")
    parser.add_argument("--checkpoint", default=None, help="encoder checkpoint: a fairseq or WavLM .pt, or a Hugging "
                        "Face directory (hubert/ssl only)")
    parser.add_argument("--layer", type=int, default=None, help="1-based transformer layer to read (hubert/ssl only)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device that runs the feature reader and the quantizer")


def reader_from_args(args: argparse.Namespace) -> FeatureReader:
    return build_feature_reader(args.features, checkpoint=args.checkpoint, layer=args.layer, device=args.device)
