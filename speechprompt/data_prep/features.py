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

This module is the registry and the command-line options, and it re-exports the rest, so that every name is
imported from here: the interface is in :mod:`.feature_reader`, the encoder reader in :mod:`.encoder_features`, the
MFCC and log-mel readers in :mod:`.spectral_features`, PocketSphinx's phones in :mod:`.phones`, and batched reading
in :mod:`.feature_batches`.
"""

from __future__ import annotations

import argparse
import os

import torch

from speechprompt.data_prep.encoder_features import HubertFeatureReader, SslFeatureReader, checkpoint_fingerprint
from speechprompt.data_prep.feature_batches import (
    DEFAULT_BATCH_SECONDS,
    FileFeatures,
    length_batches,
    read_files,
    read_waveforms,
)
from speechprompt.data_prep.feature_reader import DTYPES, FeatureError, FeatureReader, feature_mismatch, file_sha256
from speechprompt.data_prep.phones import PhoneFeatureReader
from speechprompt.data_prep.spectral_features import LogMelFeatureReader, MfccCmnFeatureReader, MfccFeatureReader

__all__ = [
    "DEFAULT_BATCH_SECONDS", "FeatureError", "FeatureReader", "FileFeatures", "HubertFeatureReader",
    "LogMelFeatureReader", "MfccCmnFeatureReader", "MfccFeatureReader", "PhoneFeatureReader", "SslFeatureReader",
    "add_feature_arguments",
    "build_feature_reader", "checkpoint_fingerprint", "feature_mismatch", "feature_reader_names", "file_sha256",
    "length_batches", "read_files", "read_waveforms", "reader_from_args", "register_feature_reader",
]

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
    name: str, checkpoint: str | os.PathLike | None = None, layer: int | None = None, device: str = "cpu",
    dtype: str = "float32",
) -> FeatureReader:
    """The registered reader ``name``, built from the options it takes, computing in ``dtype`` (see
    :meth:`FeatureReader.set_dtype`)."""
    if name not in _READERS:
        raise FeatureError(f"unknown feature reader {name!r}; choose from {', '.join(_READERS)}")
    if dtype not in DTYPES:
        raise FeatureError(f"unknown --dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    reader = _READERS[name].from_options(str(checkpoint) if checkpoint is not None else None, layer, device)
    reader.set_dtype(dtype)
    return reader


register_feature_reader("hubert", HubertFeatureReader)
register_feature_reader("ssl", SslFeatureReader)
register_feature_reader("mfcc", MfccFeatureReader)
register_feature_reader("mfcc_cmn", MfccCmnFeatureReader)
register_feature_reader("logmel", LogMelFeatureReader)
register_feature_reader("phones", PhoneFeatureReader)  # pocketsphinx is imported only when the reader is built


# --------------------------------------------------------------------------------------------------------------
# Command-line options


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
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="compute type of the encoder (hubert/ssl only): bf16 halves its memory and is faster "
                        "on recent GPUs/CPUs; features stay float32")


def reader_from_args(args: argparse.Namespace) -> FeatureReader:
    if getattr(args, "batch_seconds", 0.0) < 0:
        raise FeatureError(f"--batch-seconds must be >= 0, got {args.batch_seconds}")
    return build_feature_reader(args.features, checkpoint=args.checkpoint, layer=args.layer, device=args.device,
                                dtype=getattr(args, "dtype", "float32"))
