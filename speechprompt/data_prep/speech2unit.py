"""Turn a manifest's audio into discrete units: features, nearest k-means centroid, optional dedup.

Writes DIR/<manifest stem>.units: one line per manifest row, in manifest order, of space-separated unit ids,
and DIR/<stem>.summary.json (utterances, skipped files with reasons, seconds of audio, frames, units, units per
second, the feature reader and the quantizer).

A file that cannot be read (corrupt, empty, silent, NaN, too short) is logged and skipped, and the rest are
kept. Its line is left EMPTY, so that line i of the .units file always belongs to manifest row i (and to line i
of the .labels file); the summary lists the skipped rows.

Sharding: with --nshard N --rank R, rank R converts a contiguous slice of the rows into DIR/<stem>.<R>_<N>.units;
after all ranks have finished, one call with --nshard N --merge joins them into DIR/<stem>.units. The result is
identical to a single run.

Batching: utterances are read in length-sorted batches of at most ``--batch-seconds`` of padded audio (features
equal to one-at-a-time reading within 1e-5; 0 reads one file at a time), and their lines are still written in
manifest order.

Resuming: every utterance is appended to a .partial file as it is done, so a killed run continues where it
stopped when started again with the same options. Final files are moved into place atomically. A second process
converting the same manifest (or the same shard) into the same directory is refused while the first runs; other
shards run side by side.

Example:
    speechprompt prepare --manifest data/train.tsv --features hubert --checkpoint hubert_base_ls960.pt \\
        --layer 6 --kmeans km100.bin --out units/ --dedup
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from speechprompt.audio import SAMPLE_RATE
from speechprompt.data_prep.features import (
    DEFAULT_BATCH_SECONDS,
    FeatureReader,
    FileFeatures,
    add_feature_arguments,
    read_files,
    reader_from_args,
)
from speechprompt.data_prep.kmeans import Quantizer, QuantizerError, load_quantizer
from speechprompt.data_prep.manifest import read_manifest, shard_range
from speechprompt.errors import SpeechPromptError
from speechprompt.fileio import atomic_open, read_json, write_json
from speechprompt.lock import DirectoryLock
from speechprompt.progress import Progress

logger = logging.getLogger(__name__)


class PrepareError(SpeechPromptError):
    """Options, shards or partial files that ``prepare`` cannot work with."""


def output_paths(out_dir: str | os.PathLike, stem: str, nshard: int | None = None, rank: int = 0) -> dict[str, Path]:
    """The ``units``, ``summary`` and ``partial`` files of a run: ``<stem>.*`` unsharded, ``<stem>.<R>_<N>.*``
    for rank R of N."""
    base = Path(out_dir) / (stem if nshard is None else f"{stem}.{rank}_{nshard}")
    return {
        "units": base.with_name(base.name + ".units"),
        "summary": base.with_name(base.name + ".summary.json"),
        "partial": base.with_name(base.name + ".units.partial"),
    }


def _read_partial(path: Path, settings: dict[str, Any], start: int) -> list[dict[str, Any]]:
    """The finished rows recorded in a partial file, in order from ``start``.

    A torn last line (a kill in mid-write) and anything after a gap are dropped. A partial file written with other
    settings is discarded: its units would not match.
    """
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    try:
        header = json.loads(lines[0]) if lines and lines[0].endswith("\n") else None
    except json.JSONDecodeError:
        header = None
    if header != {"settings": settings}:
        logger.warning("%s was written with other settings (or is damaged); starting over", path)
        return []
    records = []
    for line in lines[1:]:
        if not line.endswith("\n"):
            break
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break
        if not isinstance(rec, dict) or rec.get("row") != start + len(records):
            break
        records.append(rec)
    return records


def _convert(path: Path, result: FileFeatures, quantizer: Quantizer, deduplicate: bool) -> dict[str, Any]:
    """One row's record from its features; raises the error that made the file unreadable."""
    if result.error is not None:
        raise result.error
    units = quantizer.units(result.feats, deduplicate=deduplicate, source=str(path))
    return {"units": " ".join(map(str, units)), "samples": result.samples, "frames": int(result.feats.size(0)),
            "n_units": len(units)}


def _summary(records: list[dict[str, Any]], settings: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    ok = [r for r in records if "units" in r]
    samples = sum(r["samples"] for r in ok)
    units = sum(r["n_units"] for r in ok)
    seconds = samples / SAMPLE_RATE
    return {
        "manifest": settings["manifest"],
        "rows": settings["rows"],
        "utterances": len(ok),
        "skipped": [{"row": r["row"], "path": r["path"], "reason": r["skipped"]} for r in records if "units" not in r],
        "samples": samples,
        "seconds": round(seconds, 3),
        "frames": sum(r["frames"] for r in ok),
        "units": units,
        "units_per_second": round(units / seconds, 3) if seconds else 0.0,
        "dedup": settings["dedup"],
        "features": settings["features"],
        "quantizer": settings["quantizer"],
        **extra,
    }


def prepare(
    manifest_path: str | os.PathLike,
    reader: FeatureReader,
    quantizer: Quantizer,
    out_dir: str | os.PathLike,
    deduplicate: bool = False,
    nshard: int | None = None,
    rank: int = 0,
    batch_seconds: float = DEFAULT_BATCH_SECONDS,
) -> dict[str, Any]:
    """Convert (a shard of) a manifest to units, resuming from a partial file if one is there.

    Args:
        manifest_path: the manifest TSV.
        reader: the feature reader; it must be the one ``quantizer`` was learned on.
        quantizer: the k-means quantizer.
        out_dir: where the ``.units``, ``.summary.json`` (and, while running, ``.units.partial``) files go.
        deduplicate: merge consecutive repeated units.
        nshard: number of shards, or ``None`` to convert every row into the final file directly.
        rank: which shard, in ``[0, nshard)``.
        batch_seconds: read length-sorted batches of at most this much padded audio (0: one file at a time). The
            units do not depend on it, so a run may resume with another value.

    Returns:
        The summary that was written to the ``.summary.json`` file.
    """
    quantizer.check_features(reader)
    manifest_path = Path(manifest_path)
    manifest = read_manifest(manifest_path)
    start, end = shard_range(len(manifest), nshard or 1, rank)
    paths = output_paths(out_dir, manifest_path.stem, nshard, rank)
    settings = {
        "manifest": str(manifest_path.resolve()),
        "rows": [start, end],
        "dedup": bool(deduplicate),
        "features": reader.describe(),
        "quantizer": quantizer.describe(),
    }
    with DirectoryLock(out_dir, command="speechprompt prepare", name=f".lock.{paths['units'].name}"):
        return _prepare(manifest, paths, settings, reader, quantizer, deduplicate, nshard, rank, batch_seconds)


def _prepare(manifest: Any, paths: dict[str, Path], settings: dict[str, Any], reader: FeatureReader,
             quantizer: Quantizer, deduplicate: bool, nshard: int | None, rank: int,
             batch_seconds: float) -> dict[str, Any]:
    start, end = settings["rows"]
    records = _read_partial(paths["partial"], settings, start)
    if records:
        logger.info("resuming %s: %d of %d rows already done", paths["partial"], len(records), end - start)
    # Rewrite the valid prefix (dropping a torn line), then append one flushed line per utterance.
    with atomic_open(paths["partial"], "w", encoding="utf-8") as f:
        f.write(json.dumps({"settings": settings}) + "\n")
        f.writelines(json.dumps(r) + "\n" for r in records)
    with open(paths["partial"], "a", encoding="utf-8") as f, \
            Progress(end - start, f"prepare {paths['units'].name}", unit="utt", initial=len(records)) as bar:
        rows = range(start + len(records), end)
        results = read_files(reader, [manifest.path(row) for row in rows], batch_seconds,
                             sizes=[manifest.entries[row].num_samples for row in rows])
        for row, res in zip(rows, results):  # in manifest order, whatever order the batches ran in
            bar.update()
            path = manifest.path(row)
            try:
                rec = {"row": row, **_convert(path, res, quantizer, deduplicate)}
            except QuantizerError:
                raise  # a mismatched quantizer is not a bad file: every row would fail the same way
            except Exception as e:  # one unreadable file must not sink a corpus; it is reported instead
                reason = getattr(e, "problem", None) or str(e) or type(e).__name__  # AudioError: without the path
                logger.warning("skipped row %d, %s: %s", row, path, reason)
                rec = {"row": row, "path": str(path), "skipped": reason}
            f.write(json.dumps(rec) + "\n")
            f.flush()
            records.append(rec)
        os.fsync(f.fileno())
    if records and not any("units" in r for r in records):
        logger.error("every one of the %d files failed (first: %s: %s)", len(records), records[0]["path"],
                     records[0]["skipped"])
    with atomic_open(paths["units"], "w", encoding="utf-8") as f:
        f.writelines(r.get("units", "") + "\n" for r in records)
    summary = _summary(records, settings, {"shard": None if nshard is None else {"rank": rank, "nshard": nshard}})
    write_json(paths["summary"], summary)
    paths["partial"].unlink()
    return summary


def merge_shards(manifest_path: str | os.PathLike, out_dir: str | os.PathLike, nshard: int) -> dict[str, Any]:
    """Join the finished shards ``0..nshard-1`` into ``<stem>.units`` and one summary; the result is what a single
    unsharded run writes."""
    manifest_path = Path(manifest_path)
    n = len(read_manifest(manifest_path))
    stem = manifest_path.stem
    shards = [output_paths(out_dir, stem, nshard, r) for r in range(nshard)]
    missing = [r for r, p in enumerate(shards) if not (p["units"].is_file() and p["summary"].is_file())]
    if missing:
        running = [r for r in missing if shards[r]["partial"].exists()]
        raise PrepareError(
            f"cannot merge: rank(s) {', '.join(map(str, missing))} of {nshard} have not finished in {out_dir}"
            + (f" (rank(s) {', '.join(map(str, running))} have a .partial file: still running, or killed; "
               "rerun them)" if running else "")
        )
    summaries = [read_json(p["summary"]) for p in shards]
    for r, s in enumerate(summaries):
        if s["rows"] != list(shard_range(n, nshard, r)):
            raise PrepareError(f"{shards[r]['summary']}: rows {s['rows']} are not rank {r} of {nshard} of {n} rows "
                               "(was the manifest changed?)")
        for key in ("dedup", "features", "quantizer"):
            if s[key] != summaries[0][key]:
                raise PrepareError(f"cannot merge: rank {r} used other {key} than rank 0 ({s[key]} vs "
                                   f"{summaries[0][key]})")
    lines = []
    for r, p in enumerate(shards):
        shard_lines = p["units"].read_text(encoding="utf-8").splitlines(keepends=True)
        expected = summaries[r]["rows"][1] - summaries[r]["rows"][0]
        if len(shard_lines) != expected:
            raise PrepareError(f"{p['units']}: {len(shard_lines)} lines, expected {expected}")
        lines.extend(shard_lines)
    final = output_paths(out_dir, stem)
    lock = DirectoryLock(out_dir, command="speechprompt prepare --merge", name=f".lock.{final['units'].name}")
    lock.acquire()  # held until the summary is written: the pair appears together
    samples = sum(s["samples"] for s in summaries)
    units = sum(s["units"] for s in summaries)
    seconds = samples / SAMPLE_RATE
    summary = {
        **summaries[0],
        "rows": [0, n],
        "utterances": sum(s["utterances"] for s in summaries),
        "skipped": [k for s in summaries for k in s["skipped"]],
        "samples": samples,
        "seconds": round(seconds, 3),
        "frames": sum(s["frames"] for s in summaries),
        "units": units,
        "units_per_second": round(units / seconds, 3) if seconds else 0.0,
        "shard": None,
        "merged_from": nshard,
    }
    try:
        with atomic_open(final["units"], "w", encoding="utf-8") as f:
            f.writelines(lines)
        write_json(final["summary"], summary)
    finally:
        lock.release()
    return summary


# --------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, help="manifest TSV (root line, then relpath<TAB>num_samples)")
    add_feature_arguments(parser, required=False)
    parser.add_argument("--kmeans", default=None,
                        help="quantizer: a file from `speechprompt kmeans` or an official sklearn km.bin")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--dedup", action="store_true", help="merge consecutive repeated units")
    parser.add_argument("--nshard", type=int, default=None,
                        help="split the rows into this many contiguous shards (one per job)")
    parser.add_argument("--rank", type=int, default=0, help="which shard this job converts, in [0, nshard)")
    parser.add_argument("--merge", action="store_true",
                        help="join the finished shards of --nshard into <stem>.units and one summary")


def run(args: argparse.Namespace) -> int:
    if args.merge:
        if args.nshard is None:
            raise PrepareError("--merge needs --nshard (the number of shards to join)")
        summary = merge_shards(args.manifest, args.out, args.nshard)
    else:
        if args.features is None or args.kmeans is None:
            raise PrepareError("--features and --kmeans are required (unless --merge)")
        if args.nshard is None and args.rank != 0:
            raise PrepareError("--rank needs --nshard (the number of shards)")
        if args.nshard is not None:
            shard_range(1, args.nshard, args.rank)  # validates nshard/rank before anything heavy is loaded
        quantizer = load_quantizer(args.kmeans)
        reader = reader_from_args(args)
        summary = prepare(args.manifest, reader, quantizer, args.out, deduplicate=args.dedup, nshard=args.nshard,
                          rank=args.rank, batch_seconds=args.batch_seconds)
    paths = output_paths(args.out, Path(args.manifest).stem, None if args.merge else args.nshard, args.rank)
    print(f"wrote {paths['units']}: {summary['utterances']} utterances, {len(summary['skipped'])} skipped, "
          f"{summary['seconds']:.1f} s of audio, {summary['units_per_second']:.1f} units/s")
    return 0
