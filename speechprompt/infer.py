"""Predict from audio files with a task checkpoint: one JSON line per file.

    speechprompt infer --checkpoint exp/synthetic_commands/prompt/best.safetensors a.wav b.flac

Each file goes through the unit pipeline recorded in the checkpoint (the feature reader and k-means quantizer the
training units were made with, and their deduplication), then through the frozen unit LM with the trained task
parameters. Printed on stdout, in input order::

    {"path": "a.wav", "prediction": "yes"}
    {"path": "bad.wav", "error": "bad.wav: empty file (0 bytes)"}

A file that cannot be used gives an ``error`` line and the other files are still processed. Exit status: 0 when
at least one file got a prediction, 1 when every file failed, 2 for a problem with the checkpoint or options
(then nothing is predicted).

``--base``, ``--kmeans`` and ``--hubert`` replace the paths recorded at training time (for a checkpoint moved to
another machine); the base model's and quantizer's fingerprints are checked either way.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from speechprompt.devices import resolve_device
from speechprompt.errors import CheckpointError, SpeechPromptError
from speechprompt.evaluate import load_task
from speechprompt.tasks.data import collate

logger = logging.getLogger(__name__)


class UnitPipeline:
    """Audio file -> unit token ids, rebuilt from a checkpoint's ``units`` record.

    Args:
        units_meta: The checkpoint sidecar's ``units`` section (features, quantizer, dedup, max_len).
        kmeans: Quantizer path overriding the recorded one.
        hubert: HuBERT checkpoint overriding the recorded one (hubert features only).
        device: Where features are computed.
        check: The checkpoint, whose ``check_quantizer`` refuses a quantizer with another fingerprint.
    """

    def __init__(
        self, units_meta: dict[str, Any], kmeans: str | None, hubert: str | None, device: str, check: Any
    ) -> None:
        from speechprompt.data_prep.features import build_feature_reader, file_sha256
        from speechprompt.data_prep.kmeans import load_quantizer

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
        self.max_len = units_meta.get("max_len")

    def tokens(self, path: str) -> list[int]:
        """Unit token ids (unit + 4) of one audio file. Raises ``AudioError`` for an unusable file."""
        from speechprompt.audio import load_audio
        from speechprompt.errors import AudioError
        from speechprompt.verbalizers import NSPECIAL

        wav = load_audio(path)  # (T,) float32 at 16 kHz
        units = self.quantizer.units(self.reader.read(wav), deduplicate=self.dedup, source=path)
        if not units:
            raise AudioError(path, "too short: no feature frame")
        if self.max_len is not None:
            units = units[: self.max_len]
        return [u + NSPECIAL for u in units]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="task checkpoint (NAME.safetensors with NAME.json beside)")
    parser.add_argument("audio", nargs="+", help="audio files (anything libsndfile reads; resampled to 16 kHz)")
    parser.add_argument("--base", default=None, help="base unit LM (default: the path recorded in the checkpoint)")
    parser.add_argument("--kmeans", default=None, help="k-means quantizer (default: the recorded path)")
    parser.add_argument("--hubert", default=None, help="HuBERT checkpoint for hubert features (default: recorded)")
    parser.add_argument("--decoder", default=None,
                        help="which prediction to print for classification: greedy or constrained (fixed "
                        "verbalizers); default: the task's own (greedy, argmax for learnable/probe)")
    parser.add_argument("--batch-size", type=int, default=16, help="files per batch")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def run(args: argparse.Namespace) -> int:
    task, ckpt, _ = load_task(args.checkpoint, args.base, args.device)
    device = resolve_device(args.device)
    decoder = args.decoder or task.default_metric.split(".")[0]
    if decoder not in task.decoders:
        raise SpeechPromptError(f"--decoder {decoder!r} is not one of this task's: {', '.join(task.decoders)}")
    pipeline = UnitPipeline(ckpt.meta.get("units") or {}, args.kmeans, args.hubert, str(device), ckpt)
    ok = 0
    for start in range(0, len(args.audio), args.batch_size):
        paths = args.audio[start : start + args.batch_size]
        results: dict[str, dict[str, Any]] = {}
        good: list[tuple[str, list[int]]] = []
        for i, path in enumerate(paths):
            try:
                good.append((f"{i}", pipeline.tokens(path)))
            except (SpeechPromptError, OSError, RuntimeError, ValueError) as e:  # one bad file must not stop the rest
                results[f"{i}"] = {"path": path, "error": str(e)}
        if good:
            batch = collate([t for _, t in good], [""] * len(good), None).to(device)
            hyps = task.predict(batch)[decoder]
            for (key, _), hyp in zip(good, hyps):
                results[key] = {"path": paths[int(key)], "prediction": hyp}
                ok += 1
        for i in range(len(paths)):
            print(json.dumps(results[f"{i}"]), flush=True)
    if not ok:
        print(f"speechprompt infer: every one of the {len(args.audio)} files failed", file=sys.stderr)
        return 1
    return 0
