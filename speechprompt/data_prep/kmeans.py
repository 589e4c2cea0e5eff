"""Learn a k-means quantizer of speech features (GSLM's MiniBatchKMeans settings) and save it safely.

The centroids are saved as safetensors, with JSON metadata naming the feature reader they were learned on
(name, layer, checkpoint sha256), so that ``speechprompt prepare`` can refuse features they do not fit. An
official GSLM ``km.bin`` (a joblib pickle of sklearn's MiniBatchKMeans) loads too: only its centroids are read,
and nothing in the pickle is executed.

A reader of symbols (``--features phones``: one-hot phone frames) is not clustered: its quantizer is the identity
over the symbols, written in the same format, so that ``prepare`` and everything after it treat both alike.

Example:
    speechprompt kmeans --manifest data/train.tsv --features hubert --checkpoint hubert_base_ls960.pt \\
        --layer 6 --k 100 --out km100.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import struct
import time
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speechprompt.config import option, to_dict
from speechprompt.data_prep.features import (
    DEFAULT_BATCH_SECONDS,
    FeatureReader,
    add_feature_arguments,
    feature_mismatch,
    file_sha256,
    read_files,
    reader_from_args,
)
from speechprompt.data_prep.manifest import read_manifest
from speechprompt.errors import SpeechPromptError
from speechprompt.fileio import atomic_open
from speechprompt.progress import Progress

logger = logging.getLogger(__name__)

FORMAT = "speechprompt-kmeans"
FORMAT_VERSION = "1"


class QuantizerError(SpeechPromptError):
    """A quantizer file that cannot be read, or one that does not fit the features given to it."""


@dataclasses.dataclass
class KMeansConfig:
    """How the quantizer is learned. The defaults are GSLM's (``cluster_kmeans.py`` / ``learn_kmeans.py``)."""

    k: int = option(100, help="number of clusters (units)")
    percent: float = option(0.1, help="fraction of the manifest's utterances whose frames are clustered, in (0, 1]")
    seed: int = option(1369, help="seed of the utterance sampling and of k-means")
    init: str = option("k-means++", help="centroid initialisation (sklearn: k-means++ or random)")
    batch_size: int = option(10000, help="mini-batch size")
    max_iter: int = option(150, help="maximum passes over the data")
    n_init: int = option(20, help="initialisations tried; the best inertia wins")
    reassignment_ratio: float = option(0.5, help="how eagerly sparsely used centroids are reassigned")
    max_no_improvement: int = option(100, help="stop after this many mini-batches without improvement")
    tol: float = option(0.0, help="early-stopping tolerance on centroid movement (0 disables it)")

    def __post_init__(self) -> None:
        if self.k < 2:
            raise ValueError(f"k must be at least 2, got {self.k}")
        if not 0.0 < self.percent <= 1.0:
            raise ValueError(f"percent must be in (0, 1], got {self.percent}")
        if self.init not in ("k-means++", "random"):
            raise ValueError(f"init must be 'k-means++' or 'random', got {self.init!r}")
        for name in ("batch_size", "max_iter", "n_init"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def learn_kmeans(feats: np.ndarray, cfg: KMeansConfig, verbose: bool = False) -> np.ndarray:
    """Fit sklearn's MiniBatchKMeans with ``cfg`` on ``feats`` (N, D). Returns the centroids (K, D) float32."""
    from sklearn.cluster import MiniBatchKMeans

    if len(feats) < cfg.k:
        raise QuantizerError(f"only {len(feats)} frames to learn {cfg.k} clusters; raise --percent or use more data")
    km = MiniBatchKMeans(
        n_clusters=cfg.k,
        init=cfg.init,
        max_iter=cfg.max_iter,
        batch_size=cfg.batch_size,
        tol=cfg.tol,
        max_no_improvement=cfg.max_no_improvement,
        n_init=cfg.n_init,
        reassignment_ratio=cfg.reassignment_ratio,
        compute_labels=False,
        init_size=None,
        random_state=cfg.seed,
        verbose=int(verbose),
    )
    km.fit(np.ascontiguousarray(feats, dtype=np.float32))
    return np.ascontiguousarray(km.cluster_centers_, dtype=np.float32)


def dedup(units: Iterable[int]) -> list[int]:
    """Merge runs of the same unit: ``[5, 5, 7, 7, 7, 5]`` -> ``[5, 7, 5]``."""
    out: list[int] = []
    for u in units:
        u = int(u)
        if not out or out[-1] != u:
            out.append(u)
    return out


class Quantizer:
    """Nearest-centroid assignment of features to unit ids.

    Args:
        centroids: (K, D) float tensor.
        path: the file it was read from (named in error messages and summaries).
        features: the description of the feature reader it was learned on, if known (``km.bin`` has none).
        metadata: anything else stored with it.
    """

    # Distances are computed for this many (row, centroid) pairs at a time, bounding memory to ~16 MB of float32.
    chunk_elements = 1 << 22

    def __init__(
        self,
        centroids: torch.Tensor | np.ndarray,
        path: str | None = None,
        features: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        c = torch.as_tensor(np.asarray(centroids) if not isinstance(centroids, torch.Tensor) else centroids)
        if c.dim() != 2 or c.size(0) < 1:
            raise QuantizerError(f"{path or 'quantizer'}: centroids must be a non-empty (K, D) matrix, got "
                                 f"{tuple(c.shape)}")
        if not torch.isfinite(c).all():
            raise QuantizerError(f"{path or 'quantizer'}: centroids contain NaN or inf")
        self.centroids = c.float().contiguous()  # (K, D)
        self.path = path
        self.features = features
        self.metadata = metadata or {}
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def k(self) -> int:
        return self.centroids.size(0)

    @property
    def dim(self) -> int:
        return self.centroids.size(1)

    def _centroids_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on:
            c = self.centroids.to(device)
            self._on[device] = (c, (c * c).sum(1))  # (K, D), (K,)
        return self._on[device]

    def check_dim(self, dim: int, source: str | None = None) -> None:
        """Raise a clear error if features of dimension ``dim`` cannot be quantized by these centroids."""
        if dim != self.dim:
            raise QuantizerError(
                f"mismatched k-means: the features{f' of {source}' if source else ''} have dimension {dim}, but "
                f"the quantizer {self.path or ''} has {self.k} centroids of dimension {self.dim}"
            )

    def assign(self, feats: torch.Tensor, source: str | None = None) -> torch.Tensor:
        """Unit ids of features.

        Args:
            feats: (N, D) features.
            source: where the features come from, named in the error if the dimension does not match.

        Returns:
            (N,) int64 ids of the nearest centroids (Euclidean), on ``feats``' device.
        """
        if feats.dim() != 2:
            raise QuantizerError(f"expected (N, D) features, got shape {tuple(feats.shape)}")
        self.check_dim(feats.size(1), source)
        c, c_sq = self._centroids_on(feats.device)
        x = feats.to(torch.float32)
        rows = max(1, self.chunk_elements // self.k)
        out = torch.empty(x.size(0), dtype=torch.long, device=x.device)
        with torch.inference_mode():
            for start in range(0, x.size(0), rows):
                xb = x[start : start + rows]  # (n, D)
                # ||x||^2 - 2 x.C^T + ||C||^2, without ||x||^2: it is the same for every centroid of a row, so the
                # argmin does not change. This is the sum sklearn's predict forms (one GEMM added onto ||C||^2),
                # which keeps float32 near-ties resolved the same way.
                dist = torch.addmm(c_sq, xb, c.t(), alpha=-2.0)  # (n, K)
                out[start : start + rows] = dist.argmin(dim=1)
        return out

    def units(self, feats: torch.Tensor, deduplicate: bool = False, source: str | None = None) -> list[int]:
        """Unit ids of one utterance as a list, with consecutive repeats merged if ``deduplicate``."""
        ids = self.assign(feats, source).tolist()
        return dedup(ids) if deduplicate else ids

    def check_features(self, reader: FeatureReader) -> None:
        """Refuse a reader whose features this quantizer was not learned on (dimension, and reader identity when
        the quantizer file records it)."""
        self.check_dim(reader.dim, f"the {reader.name} reader")
        if self.features is None:
            logger.info("%s records no feature reader (an sklearn km.bin?); only the dimension was checked",
                        self.path)
            return
        diff = feature_mismatch(self.features, reader.describe())
        if diff:
            raise QuantizerError(
                f"mismatched k-means: {self.path} was learned on other features than the {reader.name} reader "
                f"gives ({diff}); use the same --features/--checkpoint/--layer as for `speechprompt kmeans`"
            )

    def describe(self) -> dict[str, Any]:
        return {"path": self.path, "k": self.k, "dim": self.dim,
                "fingerprint": file_sha256(self.path) if self.path and Path(self.path).is_file() else None}


def save_quantizer(
    path: str | os.PathLike,
    centroids: np.ndarray | torch.Tensor,
    features: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write centroids (K, D) as safetensors with JSON metadata, atomically. No pickle is involved."""
    from safetensors.torch import save

    c = torch.as_tensor(np.asarray(centroids) if not isinstance(centroids, torch.Tensor) else centroids)
    c = c.float().contiguous()
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "k": str(c.size(0)),
        "dim": str(c.size(1)),
        "features": json.dumps(features) if features is not None else "null",
        "extra": json.dumps(extra or {}),
    }
    with atomic_open(path, "wb") as f:
        f.write(save({"centroids": c}, metadata=metadata))


def _is_safetensors(path: Path) -> bool:
    """safetensors starts with a little-endian u64 header length, then the JSON header itself."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n <= path.stat().st_size - 8


def load_quantizer(path: str | os.PathLike) -> Quantizer:
    """Read our safetensors centroid file or an official sklearn ``km.bin`` (centroids only, safely)."""
    from speechprompt.kmeans_pickle import read_kmeans_pickle

    p = Path(path)
    if not p.is_file():
        raise QuantizerError(f"{path}: no such k-means file")
    if not _is_safetensors(p):
        return Quantizer(read_kmeans_pickle(p), path=str(p))
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            if "centroids" not in f.keys():  # noqa: SIM118 (safe_open has keys(), not __contains__)
                raise QuantizerError(f"{path}: safetensors file has no 'centroids' tensor; not a quantizer")
            centroids = f.get_tensor("centroids")
    except SafetensorError as e:
        raise QuantizerError(f"{path}: unreadable safetensors file ({e})") from None
    try:
        features = json.loads(meta.get("features", "null"))
        extra = json.loads(meta.get("extra", "{}"))
    except json.JSONDecodeError as e:
        raise QuantizerError(f"{path}: corrupt quantizer metadata ({e})") from None
    return Quantizer(centroids, path=str(p), features=features, metadata=extra)


def collect_features(
    manifest_path: str | os.PathLike, reader: FeatureReader, percent: float = 1.0, seed: int = 0,
    batch_seconds: float = DEFAULT_BATCH_SECONDS,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Features (N, D) of a random ``percent`` of a manifest's utterances, concatenated.

    Utterances are sampled (without replacement, ``ceil(n * percent)`` of them, as fairseq's ``learn_kmeans``),
    not frames, so each one's frames stay together. Unreadable files are logged and left out. They are read in
    length-sorted batches of at most ``batch_seconds`` of padded audio (0: one at a time); the result is in row
    order either way.

    Returns:
        The features and a summary (utterances sampled and used, frames, skipped files with reasons).
    """
    manifest = read_manifest(manifest_path)
    n = len(manifest)
    if n == 0:
        raise QuantizerError(f"{manifest_path} lists no audio")
    n_sample = min(n, max(1, math.ceil(n * percent)))
    rows = np.sort(np.random.default_rng(seed).choice(n, n_sample, replace=False))
    feats, skipped = [], []
    with Progress(len(rows), "kmeans features", unit="utt") as bar:
        rows = rows.tolist()
        results = read_files(reader, [manifest.path(row) for row in rows], batch_seconds,
                             sizes=[manifest.entries[row].num_samples for row in rows])
        for row, res in zip(rows, results):
            bar.update()
            path = manifest.path(row)
            if res.error is not None:  # any unreadable file is skipped: one bad file must not sink a corpus
                e = res.error
                reason = getattr(e, "problem", None) or str(e) or type(e).__name__  # AudioError: without the path
                skipped.append({"row": row, "path": str(path), "reason": reason})
                logger.warning("skipped %s: %s", path, reason)
                continue
            feats.append(res.feats.float().cpu().numpy())
    if not feats:
        raise QuantizerError(f"no readable audio among the {n_sample} sampled utterances of {manifest_path}")
    data = np.concatenate(feats)  # (N, D)
    info = {"utterances_sampled": n_sample, "utterances_used": len(feats), "frames": len(data), "skipped": skipped}
    return data, info


# --------------------------------------------------------------------------------------------------------------
# CLI


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--name`` option per :class:`KMeansConfig` field, with its help and default."""
    hints = typing.get_type_hints(KMeansConfig)
    for f in dataclasses.fields(KMeansConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=hints[f.name], default=f.default,
                            help=f.metadata["help"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, help="manifest TSV of the audio to learn from")
    add_feature_arguments(parser)
    parser.add_argument("--out", required=True, help="where to write the quantizer (safetensors + JSON metadata)")
    _config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = KMeansConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(KMeansConfig)})
    except ValueError as e:
        raise QuantizerError(str(e)) from None
    reader = reader_from_args(args)
    if reader.discrete:
        return _write_identity(args, reader)
    feats, info = collect_features(args.manifest, reader, cfg.percent, cfg.seed, batch_seconds=args.batch_seconds)
    logger.info("clustering %d frames (%d-d) of %d utterances into %d clusters", len(feats), feats.shape[1],
                info["utterances_used"], cfg.k)
    start = time.perf_counter()
    centroids = learn_kmeans(feats, cfg, verbose=getattr(args, "verbose", False))
    seconds = time.perf_counter() - start
    save_quantizer(args.out, centroids, features=reader.describe(),
                   extra={"config": to_dict(cfg), "manifest": str(Path(args.manifest).resolve()),
                          **{k: v for k, v in info.items() if k != "skipped"}, "skipped": len(info["skipped"]),
                          "fit_seconds": round(seconds, 2)})
    print(f"wrote {args.out}: {cfg.k} centroids of dimension {feats.shape[1]} from {len(feats)} frames "
          f"({info['utterances_used']} utterances, {len(info['skipped'])} skipped) in {seconds:.1f} s")
    return 0



def _write_identity(args: argparse.Namespace, reader: FeatureReader) -> int:
    """A reader of symbols (one-hot frames, e.g. phones) is quantized by the identity: each symbol is a unit.
    Nothing is read or clustered; ``--k`` and the clustering options do not apply."""
    symbols = getattr(reader, "symbols", None)
    save_quantizer(args.out, torch.eye(reader.dim), features=reader.describe(),
                   extra={"identity": True, "symbols": symbols})
    print(f"wrote {args.out}: the {reader.dim} symbols of the {reader.name} reader are the units (identity "
          "quantizer; no clustering)")
    return 0
