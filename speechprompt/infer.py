"""Predict from audio files with a task checkpoint: one JSON line per file.

    speechprompt infer --checkpoint exp/synthetic_commands/prompt/best.safetensors a.wav b.flac
    speechprompt infer --checkpoint exp/superb/ks_lora/best.safetensors a.wav b.flac
    speechprompt infer --checkpoint wav2vec2-base-960h/ a.wav          # a fine-tuned encoder with its own head

The checkpoint's sidecar says how audio reaches it. A unit-LM checkpoint (``speechprompt train``): each file goes
through the unit pipeline recorded in the checkpoint (the feature reader and k-means quantizer the training units
were made with, and their deduplication), then through the frozen unit LM with the trained task parameters. A
SUPERB checkpoint (``speechprompt superb``): the waveforms go straight into the HuBERT upstream with its tuning
method, the weighted layer sum and the head (a class label, or the CTC head's greedy transcript). A fine-tuned
encoder checkpoint with its own head (a fairseq CTC ``.pt``, a Hugging Face ``...ForCTC`` or
``...ForSequenceClassification`` directory) gives its transcript or label directly. Printed on stdout, in input
order::

    {"path": "a.wav", "prediction": "yes"}
    {"path": "bad.wav", "error": "bad.wav: empty file (0 bytes)"}

A file that cannot be used gives an ``error`` line and the other files are still processed. Exit status: 0 when
at least one file got a prediction, 1 when every file failed, 2 for a problem with the checkpoint or options
(then nothing is predicted).

``--base`` (alias ``--upstream``: the unit LM, or the SUPERB checkpoint's HuBERT), ``--kmeans`` and ``--hubert``
replace the paths recorded at training time (for a checkpoint moved to another machine); the base model's and
quantizer's fingerprints are checked either way.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speechprompt.audio import load_audio
from speechprompt.checkpoint import checkpoint_kind
from speechprompt.data_prep.features import build_feature_reader, file_sha256
from speechprompt.data_prep.kmeans import load_quantizer
from speechprompt.devices import resolve_device
from speechprompt.errors import AudioError, CheckpointError, SpeechPromptError
from speechprompt.models.encoders import load_encoder
from speechprompt.models.heads import CTCOutput
from speechprompt.models.unit_vocab import UnitVocab
from speechprompt.superb import load_superb
from speechprompt.tasks.data import collate
from speechprompt.tasks.loading import load_task
from speechprompt.verbalizers import NSPECIAL

logger = logging.getLogger(__name__)


class UnitPipeline:
    """Audio file -> unit token ids, rebuilt from a checkpoint's ``units`` record.

    Args:
        units_meta: The checkpoint sidecar's ``units`` section (features, quantizer, dedup, max_len).
        kmeans: Quantizer path overriding the recorded one.
        hubert: HuBERT checkpoint overriding the recorded one (hubert features only).
        device: Where features are computed.
        check: The checkpoint, whose ``check_quantizer`` refuses a quantizer with another fingerprint.
        vocab: The LM's unit layout (default GSLM's with the quantizer's number of units).
    """

    def __init__(
        self, units_meta: dict[str, Any], kmeans: str | None, hubert: str | None, device: str, check: Any,
        vocab: UnitVocab | None = None,
    ) -> None:
        features = units_meta.get("features") or {}
        quantizer_meta = units_meta.get("quantizer") or {}
        if not features.get("name"):
            raise CheckpointError(
                "the checkpoint records no feature reader (its training units had no prepare summary); "
                "infer needs units made by `speechprompt prepare`"
            )
        km_path = kmeans or quantizer_meta.get("path")
        if not km_path or not Path(km_path).is_file():
            raise CheckpointError(f"k-means quantizer {km_path or '(not recorded)'} not found; pass it with --kmeans")
        check.check_quantizer(file_sha256(km_path), km_path)
        self.reader = build_feature_reader(
            features["name"], checkpoint=hubert or features.get("checkpoint"), layer=features.get("layer"),
            device=device,
        )
        self.quantizer = load_quantizer(km_path)
        self.quantizer.check_features(self.reader)
        self.dedup = bool(units_meta.get("dedup"))
        self.vocab, self.unit_offset = vocab, NSPECIAL if vocab is None else vocab.unit_offset
        self.max_len = units_meta.get("max_len")

    def tokens(self, path: str) -> list[int]:
        """Unit token ids (unit + 4 in GSLM's layout) of one audio file. Raises ``AudioError`` for an unusable
        file."""
        wav = load_audio(path)  # (T,) float32 at 16 kHz
        units = self.quantizer.units(self.reader.read(wav), deduplicate=self.dedup, source=path)
        if not units:
            raise AudioError(path, "too short: no feature frame")
        if self.max_len is not None:
            units = units[: self.max_len]
        if self.vocab is not None:
            self.vocab.check_units(units, path)
        return [u + self.unit_offset for u in units]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="task checkpoint (NAME.safetensors with NAME.json beside)")
    parser.add_argument("audio", nargs="+", help="audio files (anything libsndfile reads; resampled to 16 kHz)")
    parser.add_argument("--base", "--upstream", dest="base", metavar="PATH", default=None,
                        help="the frozen base model: the unit LM of a unit-LM checkpoint, the HuBERT upstream of a "
                        "SUPERB checkpoint (default: the path recorded in the checkpoint; its fingerprint is "
                        "checked either way)")
    parser.add_argument("--kmeans", default=None,
                        help="k-means quantizer (unit-LM checkpoints; default: the recorded path)")
    parser.add_argument("--hubert", default=None,
                        help="HuBERT checkpoint for hubert features (unit-LM checkpoints; default: the recorded path)")
    parser.add_argument("--decoder", default=None,
                        help="which prediction to print for classification: greedy or constrained (fixed "
                        "verbalizers; unit-LM checkpoints); default: the task's own (greedy, argmax for "
                        "learnable/probe)")
    parser.add_argument("--batch-size", type=int, default=16, help="files per batch")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def predict_files(
    paths: Sequence[str], batch_size: int, read: Callable[[str], Any], predict: Callable[[list[Any]], list[str]]
) -> int:
    """Print one JSON line per file, in order, batch by batch; the shared loop of every checkpoint kind.

    Args:
        paths: The audio files.
        batch_size: Files per call of ``predict``.
        read: One file -> the model's input; raises for an unusable file, which then gets an ``error`` line.
        predict: The inputs of the readable files of a batch -> one prediction each.

    Returns:
        How many files got a prediction.
    """
    ok = 0
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        lines: list[dict[str, Any]] = [{"path": path} for path in chunk]
        good: list[tuple[int, Any]] = []
        for i, path in enumerate(chunk):
            try:
                good.append((i, read(path)))
            except (SpeechPromptError, OSError, RuntimeError, ValueError) as e:  # one bad file must not stop the rest
                lines[i]["error"] = str(e)
        if good:
            for (i, _), hyp in zip(good, predict([x for _, x in good])):
                lines[i]["prediction"] = hyp
                ok += 1
        for line in lines:
            print(json.dumps(line), flush=True)
    return ok


def _unit_lm(args: argparse.Namespace) -> tuple[Callable[[str], Any], Callable[[list[Any]], list[str]]]:
    task, ckpt, vocab = load_task(args.checkpoint, args.base, args.device)
    device = resolve_device(args.device)
    decoder = args.decoder or task.default_metric.split(".")[0]
    if decoder not in task.decoders:
        raise SpeechPromptError(f"--decoder {decoder!r} is not one of this task's: {', '.join(task.decoders)}")
    pipeline = UnitPipeline(ckpt.meta.get("units") or {}, args.kmeans, args.hubert, str(device), ckpt, vocab)

    def predict(tokens: list[list[int]]) -> list[str]:
        return task.predict(collate(tokens, [""] * len(tokens), None, vocab=vocab).to(device))[decoder]

    return pipeline.tokens, predict


def _superb(args: argparse.Namespace) -> tuple[Callable[[str], Any], Callable[[list[Any]], list[str]]]:
    unused = [flag for flag in ("kmeans", "hubert", "decoder") if getattr(args, flag) is not None]
    if unused:
        raise SpeechPromptError(
            f"{args.checkpoint} is a SUPERB checkpoint: it reads audio directly, so "
            f"{', '.join('--' + f for f in unused)} do not apply (its HuBERT upstream is --upstream)"
        )
    model = load_superb(args.checkpoint, args.base, resolve_device(args.device))

    @torch.no_grad()
    def predict(wavs: list[np.ndarray]) -> list[str]:
        output, frame_mask = model(*model.prepare(wavs))  # padded (B, T) waveforms -> head output
        return model.head.decode(output, frame_mask)

    return load_audio, predict


def _encoder(args: argparse.Namespace) -> tuple[Callable[[str], Any], Callable[[list[Any]], list[str]]]:
    """A fine-tuned encoder with its own head (fairseq ``wav2vec_ctc``/``hubert_ctc``, Hugging Face ``...ForCTC`` or
    ``...ForSequenceClassification``): its transcript or its label, out of the box."""
    unused = [flag for flag in ("base", "kmeans", "hubert", "decoder") if getattr(args, flag) is not None]
    if unused:
        raise SpeechPromptError(f"{args.checkpoint} is an encoder checkpoint with its own head: "
                                f"{', '.join('--' + f for f in unused)} do not apply")
    encoder = load_encoder(args.checkpoint).to(resolve_device(args.device))
    if encoder.head is None:
        raise SpeechPromptError(f"{args.checkpoint} is a bare {encoder.architecture} encoder with no output head: "
                                "nothing to predict; train a task on it with `speechprompt superb`")
    decode = encoder.transcribe if isinstance(encoder.head, CTCOutput) else encoder.classify

    @torch.no_grad()
    def predict(wavs: list[np.ndarray]) -> list[str]:
        return decode(*encoder.batch(wavs))

    return load_audio, predict


# Checkpoint family -> (read one file, predict a batch): a task checkpoint says its family in its sidecar (see
# :func:`speechprompt.checkpoint.checkpoint_kind`); an encoder checkpoint is a file of its own format or a directory.
PREDICTORS = {"unit_lm": _unit_lm, "superb": _superb, "encoder": _encoder}


def _kind(path: str) -> str:
    p = Path(path)
    return "encoder" if p.is_dir() or p.suffix in (".pt", ".bin") else checkpoint_kind(path)


def run(args: argparse.Namespace) -> int:
    read, predict = PREDICTORS[_kind(args.checkpoint)](args)
    if not predict_files(args.audio, args.batch_size, read, predict):
        print(f"speechprompt infer: every one of the {len(args.audio)} files failed", file=sys.stderr)
        return 1
    return 0
