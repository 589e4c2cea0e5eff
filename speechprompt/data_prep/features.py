"""Feature readers: a waveform in, a ``(frames, D)`` feature matrix out.

Readers are chosen by name through a small registry, so that a new one is one class and one
:func:`register_feature_reader` call, not another branch in every script::

    reader = build_feature_reader("hubert", checkpoint="hubert_base_ls960.pt", layer=6)
    feats = reader.read(wav)  # (frames, 768) at 50 Hz

``hubert`` (and its general name ``ssl``) reads a layer of any frame-level encoder that
:func:`~speechprompt.models.encoders.load_encoder` loads: fairseq HuBERT/wav2vec 2.0/data2vec checkpoints (CTC
fine-tuned ones too), official WavLM files, and Hugging Face directories.

Batched reading: :meth:`FeatureReader.read_batch` takes several waveforms and gives what :meth:`~FeatureReader.read`
gives each of them (the encoder reader pads them into one forward with a padding mask, exactly; other readers
loop), and :func:`read_files` reads audio files in length-sorted batches bounded by ``--batch-seconds``, yielding
the results in input order with each unreadable file's error in its place. ``prepare`` and ``kmeans`` use it.

Every reader can :meth:`~FeatureReader.describe` itself (name, dimension, layer, checkpoint and its sha256). A
quantizer stores that description when it is learned, and ``speechprompt prepare`` refuses features that do not
match it: units from the wrong layer or checkpoint are silently meaningless otherwise.
"""

from __future__ import annotations

import abc
import argparse
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from speechprompt.audio import SAMPLE_RATE, load_audio, log_mel, mfcc
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
        if _DTYPES.get(dtype) is not torch.float32:
            raise FeatureError(f"--dtype {dtype}: the {self.name} reader computes in float32 only (bf16 is for the "
                               "hubert/ssl encoder readers)")

    def describe(self) -> dict[str, Any]:
        """What identifies these features: compared by :func:`feature_mismatch`, stored with quantizers."""
        return {"name": self.name, "dim": self.dim, "frame_rate": self.frame_rate, "sample_rate": SAMPLE_RATE}


_READERS: dict[str, type[FeatureReader]] = {}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


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
    name: str, checkpoint: str | os.PathLike | None = None, layer: int | None = None, device: str = "cpu",
    dtype: str = "float32",
) -> FeatureReader:
    """The registered reader ``name``, built from the options it takes, computing in ``dtype`` (see
    :meth:`FeatureReader.set_dtype`)."""
    if name not in _READERS:
        raise FeatureError(f"unknown feature reader {name!r}; choose from {', '.join(_READERS)}")
    if dtype not in _DTYPES:
        raise FeatureError(f"unknown --dtype {dtype!r}; choose from {', '.join(_DTYPES)}")
    reader = _READERS[name].from_options(str(checkpoint) if checkpoint is not None else None, layer, device)
    reader.set_dtype(dtype)
    return reader


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

    def set_dtype(self, dtype: str) -> None:
        """Hold (and run) the encoder in ``dtype``; its GroupNorm/LayerNorm front end still computes in float32."""
        if dtype not in _DTYPES:
            raise FeatureError(f"unknown --dtype {dtype!r}; choose from {', '.join(_DTYPES)}")
        self.model.to(_DTYPES[dtype])

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def read_batch(self, wavs: Sequence[np.ndarray | torch.Tensor]) -> list[torch.Tensor]:
        """Features of several utterances in one padded forward, each equal to what :meth:`read` gives it alone
        (within float rounding: 1e-5 in float32).

        Each waveform is normalised on its own (if the checkpoint says so), right-padded with zeros, and the model
        runs with the padding mask in its exact mode (:meth:`~speechprompt.models.wav2vec2.Wav2Vec2Model.
        extract_features` ``exact_padding``: a base model's GroupNorm sees each utterance's own samples, and the
        attention masks exactly the frames the utterance does not have); each row is then cut to the frame count
        of its own length. Utterances longer than :attr:`max_chunk` (read in chunks) or shorter than the receptive
        field (no frame) are read one at a time, as :meth:`read` does.
        """
        xs = [self._waveform(w) for w in wavs]
        out: list[torch.Tensor | None] = [None] * len(xs)
        batch = [i for i, x in enumerate(xs) if self.model.receptive_field <= x.numel() <= self.max_chunk]
        if len(batch) < 2:
            return [self.read(x) for x in xs]
        with torch.inference_mode():
            for i in set(range(len(xs))) - set(batch):
                out[i] = self._read(xs[i])
            rows = [normalize_waveform(xs[i].to(self.device), self.task_cfg) for i in batch]
            lengths = torch.tensor([r.numel() for r in rows], device=self.device)  # (B,)
            source = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True).to(self.dtype)  # (B, T)
            padding = torch.arange(source.shape[1], device=self.device)[None, :] >= lengths[:, None]  # (B, T)
            feats = self.model.extract_features(source, padding, output_layer=self.layer, exact_padding=True)
            for j, i in enumerate(batch):
                frames = self.model.num_frames(int(lengths[j]))
                out[i] = feats[j, :frames].to(torch.float32, copy=True)  # (frames, D), not a view of the batch
        return out  # type: ignore[return-value]

    def _read(self, wav: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype  # a model held in bf16 computes in bf16; features stay fp32
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
            "dtype": str(self.dtype).removeprefix("torch."),
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
# PocketSphinx's phones (data_prep/phones.py, which builds on the reader base above; pocketsphinx is imported only
# when the reader is built).
from speechprompt.data_prep.phones import PhoneFeatureReader  # noqa: E402

register_feature_reader("phones", PhoneFeatureReader)


# --------------------------------------------------------------------------------------------------------------
# Reading files in batches

DEFAULT_BATCH_SECONDS = 100.0
# Audio is loaded this many batches ahead, so that sorting by length has utterances to choose from.
_WINDOW_BATCHES = 8


@dataclass
class FileFeatures:
    """One result of :func:`read_files`: the features of ``paths[index]``, or why there are none."""

    index: int
    samples: int  # waveform length after loading (0 when unreadable)
    feats: torch.Tensor | None  # (frames, D) float32
    error: Exception | None


def length_batches(lengths: Sequence[int], max_samples: int) -> list[list[int]]:
    """Indices of ``lengths`` sorted longest first and grouped so that each batch's padded size, count times its
    longest, is at most ``max_samples`` (a longer utterance is a batch of its own). ``max_samples <= 0``: one
    utterance per batch, in input order."""
    if max_samples <= 0:
        return [[i] for i in range(len(lengths))]
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        # Longest first, so the batch's first member sets its padded length.
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_samples:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def read_waveforms(
    reader: FeatureReader, wavs: Sequence[np.ndarray | torch.Tensor], batch_seconds: float = DEFAULT_BATCH_SECONDS
) -> list[torch.Tensor | Exception]:
    """Features of each waveform, in input order, read in length-sorted batches of at most ``batch_seconds`` of
    padded audio (0: one at a time). A batch that fails is read again one utterance at a time, so that one bad
    input gets its own error (in its place in the result) and the others their features."""
    out: list[torch.Tensor | Exception | None] = [None] * len(wavs)
    lengths = [len(w) for w in wavs]
    for batch in length_batches(lengths, int(batch_seconds * SAMPLE_RATE)):
        try:
            feats = reader.read_batch([wavs[i] for i in batch]) if len(batch) > 1 else [reader.read(wavs[batch[0]])]
        except Exception:  # find which one: read each alone
            feats = []
            for i in batch:
                try:
                    feats.append(reader.read(wavs[i]))
                except Exception as e:
                    feats.append(e)
        for i, f in zip(batch, feats):
            out[i] = f
    return out  # type: ignore[return-value]


def read_files(
    reader: FeatureReader,
    paths: Sequence[str | os.PathLike],
    batch_seconds: float = DEFAULT_BATCH_SECONDS,
    sizes: Sequence[int] | None = None,
) -> Iterator[FileFeatures]:
    """Load audio files and read their features, yielding one :class:`FileFeatures` per path in input order.

    Files are loaded a window at a time (about eight batches of audio, by ``sizes``, e.g. a manifest's sample
    counts), sorted by length within the window and read in batches of at most ``batch_seconds`` of padded audio
    (:func:`read_waveforms`; 0 reads one at a time). A file that cannot be loaded or read yields its exception
    and the rest are read as usual.
    """
    n = len(paths)
    max_samples = int(batch_seconds * SAMPLE_RATE)
    window = _WINDOW_BATCHES * max_samples
    start = 0
    while start < n:
        end, total = start + 1, (sizes[start] if sizes is not None else 0)
        while end < n and max_samples > 0 and (total + (sizes[end] if sizes is not None else max_samples) <= window):
            total += sizes[end] if sizes is not None else max_samples
            end += 1
        results: dict[int, FileFeatures] = {}
        wavs: dict[int, np.ndarray] = {}
        for i in range(start, end):
            try:
                wavs[i] = load_audio(paths[i])
            except Exception as e:
                results[i] = FileFeatures(i, 0, None, e)
        order = list(wavs)
        for i, f in zip(order, read_waveforms(reader, [wavs[i] for i in order], batch_seconds)):
            failed = isinstance(f, Exception)
            results[i] = FileFeatures(i, len(wavs[i]), None if failed else f, f if failed else None)
        del wavs
        for i in range(start, end):
            yield results[i]
        start = end


def add_feature_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The options that choose a feature reader, shared by ``kmeans`` and ``prepare``."""
    parser.add_argument("--features", required=required, choices=feature_reader_names(),
                        help="feature reader: hubert or ssl (a layer of a HuBERT, wav2vec 2.0, data2vec-audio or WavLM "
                        "checkpoint, 50 Hz), mfcc (39-d, 100 Hz), mfcc_cmn (mfcc minus its per-utterance mean), "
                        "logmel (80-d, 100 Hz) or phones (PocketSphinx's English phones as one-hot frames, 100 Hz; "
                        "pip install pocketsphinx)")
    parser.add_argument("--checkpoint", default=None, help="encoder checkpoint: a fairseq or WavLM .pt, or a Hugging "
                        "Face directory (hubert/ssl); phones: a PocketSphinx acoustic model directory (default: the "
                        "pocketsphinx wheel's en-us)")
    parser.add_argument("--layer", type=int, default=None, help="1-based transformer layer to read (hubert/ssl only)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device that runs the feature reader and the quantizer")
    parser.add_argument("--batch-seconds", type=float, default=DEFAULT_BATCH_SECONDS,
                        help="read length-sorted batches of at most this many seconds of padded audio per forward "
                        "(bounds memory; features equal one-at-a-time reading within 1e-5); 0 = one file at a time")
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES),
                        help="compute type of the encoder (hubert/ssl only): bf16 halves its memory and is faster "
                        "on recent GPUs/CPUs; features stay float32")


def reader_from_args(args: argparse.Namespace) -> FeatureReader:
    if getattr(args, "batch_seconds", 0.0) < 0:
        raise FeatureError(f"--batch-seconds must be >= 0, got {args.batch_seconds}")
    return build_feature_reader(args.features, checkpoint=args.checkpoint, layer=args.layer, device=args.device,
                                dtype=getattr(args, "dtype", "float32"))
