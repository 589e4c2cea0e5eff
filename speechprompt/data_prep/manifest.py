"""fairseq-style audio manifests and their label sidecars.

A manifest is a TSV file. Its first line is the root directory; every other line is ``relpath<TAB>num_samples``
for one utterance, with ``relpath`` relative to the root. Labels live beside it in ``<stem>.labels``: one line per
utterance, in the same order. Every later step (features, units, LM data) keeps that order, so line ``i`` of any
derived file belongs to manifest row ``i``.

Make one from a folder of audio and check it::

    python -m speechprompt.data_prep.manifest AUDIO_DIR OUT.tsv
    python -m speechprompt.data_prep.manifest --validate OUT.tsv
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf

from speechprompt.errors import SpeechPromptError
from speechprompt.fileio import atomic_open

logger = logging.getLogger(__name__)

# What soundfile (libsndfile) reads; the suffixes a folder scan picks up.
AUDIO_EXTENSIONS: tuple[str, ...] = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".aif", ".au", ".sph")


class ManifestError(SpeechPromptError):
    """A manifest or label file that cannot be read or does not fit its manifest."""


@dataclass(frozen=True)
class ManifestEntry:
    """One manifest row: a path relative to the manifest root and its length in samples (at the file's rate)."""

    relpath: str
    num_samples: int


@dataclass
class Manifest:
    """A parsed manifest: the root directory and the rows in order."""

    root: Path
    entries: list[ManifestEntry] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.entries)

    def path(self, index: int) -> Path:
        """The absolute path of row ``index``."""
        return self.root / self.entries[index].relpath

    def paths(self) -> list[Path]:
        return [self.root / e.relpath for e in self.entries]

    def to_text(self) -> str:
        return f"{self.root}\n" + "".join(f"{e.relpath}\t{e.num_samples}\n" for e in self.entries)


def labels_path(manifest_path: str | os.PathLike) -> Path:
    """The label sidecar of a manifest: ``dir/train.tsv`` -> ``dir/train.labels``."""
    p = Path(manifest_path)
    return p.with_suffix(".labels")


def _parse(path: Path, lines: list[str]) -> tuple[Manifest, list[str]]:
    """Parse manifest lines, collecting problems instead of stopping at the first one."""
    problems: list[str] = []
    if not lines or not lines[0].strip():
        return Manifest(Path(".")), [f"{path}: empty manifest (the first line must be the root directory)"]
    root = Path(lines[0].strip())
    if not root.is_absolute():  # fairseq takes a relative root from the working directory; we anchor it
        root = (path.parent / root).resolve() if not root.exists() else root.resolve()
    entries = []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 2 or not parts[0]:
            problems.append(f"{path}:{n}: expected 'relpath<TAB>num_samples', got {line!r}")
            continue
        try:
            num = int(parts[1])
        except ValueError:
            problems.append(f"{path}:{n}: num_samples {parts[1]!r} is not an integer")
            continue
        if num < 0:
            problems.append(f"{path}:{n}: negative num_samples {num}")
            continue
        entries.append(ManifestEntry(parts[0], num))
    return Manifest(root, entries), problems


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ManifestError(f"cannot read manifest {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not a UTF-8 text manifest") from None


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read a manifest. A malformed line is a :class:`ManifestError` naming the file and line.

    A relative root is taken relative to the working directory if it exists there (as fairseq does), else
    relative to the manifest's own directory, so that a manifest can travel with its audio.
    """
    path = Path(path)
    manifest, problems = _parse(path, _read_lines(path))
    if problems:
        raise ManifestError(problems[0] + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""))
    return manifest


def write_manifest_file(path: str | os.PathLike, manifest: Manifest) -> None:
    """Write ``manifest`` atomically."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(manifest.to_text())


def read_labels(path: str | os.PathLike) -> list[str]:
    """Read a label file: one label (any text without a newline) per line."""
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ManifestError(f"cannot read labels {path}: {e.strerror}") from None


def write_labels(path: str | os.PathLike, labels: Iterable[str]) -> None:
    """Write one label per line, atomically. A label may not contain a newline."""
    labels = list(labels)
    for i, label in enumerate(labels):
        if "\n" in label or "\r" in label:
            raise ManifestError(f"label {i} contains a newline: {label!r}")
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write("".join(f"{label}\n" for label in labels))


def _audio_files(source: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[Path, list[Path]]:
    """The root and the audio files of a folder (scanned recursively, sorted) or of an explicit list."""
    if isinstance(source, (str, os.PathLike)):
        root = Path(source).resolve()
        if not root.is_dir():
            raise ManifestError(f"{source}: not a directory")
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
        return root, files
    files = [Path(p).resolve() for p in source]
    if not files:
        raise ManifestError("no audio files given")
    root = Path(os.path.commonpath([str(p.parent) for p in files]))
    return root, files


def write_manifest(
    source: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike
) -> tuple[Manifest, list[str]]:
    """Make a manifest from a folder of audio (searched recursively) or a list of files, and write it to ``out``.

    ``num_samples`` comes from the file header (``soundfile.info``), at the file's own sample rate. Files that
    libsndfile cannot open are left out and logged.

    Returns:
        The manifest and a list of ``"path: reason"`` for the files left out.
    """
    root, files = _audio_files(source)
    entries, left_out = [], []
    for p in files:
        try:
            frames = sf.info(str(p)).frames
        except (sf.LibsndfileError, RuntimeError, OSError) as e:
            left_out.append(f"{p}: {e}")
            logger.warning("left out of the manifest: %s: %s", p, e)
            continue
        entries.append(ManifestEntry(p.relative_to(root).as_posix(), int(frames)))
    if not entries:
        raise ManifestError(f"no readable audio under {root} (extensions: {', '.join(AUDIO_EXTENSIONS)})")
    manifest = Manifest(root, entries)
    write_manifest_file(out, manifest)
    return manifest, left_out


def validate_manifest(path: str | os.PathLike, labels: str | os.PathLike | None = None) -> list[str]:
    """Check a manifest, its audio files and its label sidecar. Returns the problems found (empty if none).

    Checks: the root exists; every line parses; no path is listed twice; every file exists and its
    ``num_samples`` matches the header; the label file (``labels``, or ``<stem>.labels`` if present) has one
    line per row.
    """
    path = Path(path)
    try:
        lines = _read_lines(path)
    except ManifestError as e:
        return [str(e)]
    manifest, problems = _parse(path, lines)
    if not manifest.root.is_dir():
        problems.append(f"{path}: root directory {manifest.root} does not exist")
        return problems
    seen: set[str] = set()
    for i, entry in enumerate(manifest.entries):
        if entry.relpath in seen:
            problems.append(f"{path}: row {i} ({entry.relpath}) is listed twice")
        seen.add(entry.relpath)
        audio = manifest.root / entry.relpath
        if not audio.is_file():
            problems.append(f"{path}: row {i}: missing file {audio}")
            continue
        try:
            frames = sf.info(str(audio)).frames
        except (sf.LibsndfileError, RuntimeError, OSError) as e:
            problems.append(f"{path}: row {i}: unreadable audio {audio}: {e}")
            continue
        if frames != entry.num_samples:
            problems.append(f"{path}: row {i}: {audio} has {frames} samples, the manifest says {entry.num_samples}")
    label_file = Path(labels) if labels is not None else labels_path(path)
    if labels is not None or label_file.exists():
        try:
            n_labels = len(read_labels(label_file))
        except ManifestError as e:
            problems.append(str(e))
        else:
            if n_labels != len(manifest):
                problems.append(f"{label_file}: {n_labels} labels for {len(manifest)} manifest rows")
    return problems


def shard_range(n: int, nshard: int, rank: int) -> tuple[int, int]:
    """The contiguous rows ``[start, end)`` that shard ``rank`` of ``nshard`` takes out of ``n``.

    Uses fairseq's split (``round(n / nshard * rank)``), so shard files line up with fairseq's own dumps.
    """
    if nshard < 1:
        raise ManifestError(f"nshard must be at least 1, got {nshard}")
    if not 0 <= rank < nshard:
        raise ManifestError(f"rank must be in [0, {nshard}), got {rank}")
    return round(n / nshard * rank), round(n / nshard * (rank + 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m speechprompt.data_prep.manifest",
        description="Write a fairseq-style manifest (root, then relpath<TAB>num_samples) for a folder of audio, "
        "or check one with --validate.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="AUDIO_DIR OUT.tsv to write a manifest; MANIFEST.tsv ... with --validate")
    parser.add_argument("--validate", action="store_true",
                        help="check manifests (files, lengths, labels) instead of writing one")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.validate:
        bad = 0
        for p in args.paths:
            problems = validate_manifest(p)
            for problem in problems:
                print(problem, file=sys.stderr)
            bad += bool(problems)
            print(f"{p}: {'ok' if not problems else f'{len(problems)} problems'}")
        return 1 if bad else 0
    if len(args.paths) != 2:
        parser.error("expected AUDIO_DIR OUT.tsv")
    try:
        manifest, left_out = write_manifest(args.paths[0], args.paths[1])
    except SpeechPromptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.paths[1]}: {len(manifest)} files under {manifest.root}"
          + (f", {len(left_out)} unreadable files left out" if left_out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
