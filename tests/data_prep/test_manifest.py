"""Manifests: writing from a folder, reading, labels, validation, sharding."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechprompt.data_prep.manifest import (
    Manifest,
    ManifestEntry,
    ManifestError,
    labels_path,
    main,
    read_labels,
    read_manifest,
    shard_range,
    validate_manifest,
    write_labels,
    write_manifest,
    write_manifest_file,
)


def _wav(path: Path, n: int, sr: int = 16000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.random.default_rng(n).uniform(-0.5, 0.5, n).astype(np.float32), sr)


@pytest.fixture
def audio_dir(tmp_path: Path) -> Path:
    root = tmp_path / "audio"
    _wav(root / "b.wav", 1600)
    _wav(root / "a.wav", 3200)
    _wav(root / "sub" / "c.flac", 800, sr=8000)
    (root / "notes.txt").write_text("not audio")
    return root


def test_write_manifest_from_folder_is_sorted_recursive_and_counts_samples(audio_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "train.tsv"
    manifest, left_out = write_manifest(audio_dir, out)
    assert left_out == []
    assert out.read_text().splitlines() == [str(audio_dir.resolve()), "a.wav\t3200", "b.wav\t1600", "sub/c.flac\t800"]
    assert read_manifest(out) == manifest
    assert manifest.path(2) == audio_dir.resolve() / "sub" / "c.flac"


def test_write_manifest_leaves_out_unreadable_files(audio_dir: Path, tmp_path: Path) -> None:
    (audio_dir / "broken.wav").write_bytes(b"RIFF not really")
    manifest, left_out = write_manifest(audio_dir, tmp_path / "m.tsv")
    assert len(manifest) == 3
    assert len(left_out) == 1 and "broken.wav" in left_out[0]


def test_write_manifest_from_list_uses_common_root(audio_dir: Path, tmp_path: Path) -> None:
    manifest, _ = write_manifest([audio_dir / "sub" / "c.flac", audio_dir / "a.wav"], tmp_path / "m.tsv")
    assert manifest.root == audio_dir.resolve()
    assert [e.relpath for e in manifest.entries] == ["sub/c.flac", "a.wav"]


def test_read_manifest_reports_bad_lines(tmp_path: Path) -> None:
    p = tmp_path / "bad.tsv"
    p.write_text(f"{tmp_path}\na.wav\t12\nb.wav twelve\n")
    with pytest.raises(ManifestError, match=r"bad.tsv:3"):
        read_manifest(p)
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(ManifestError, match="empty manifest"):
        read_manifest(tmp_path / "empty.tsv")


def test_relative_root_is_anchored_at_the_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data" / "wavs").mkdir(parents=True)
    p = tmp_path / "data" / "m.tsv"
    write_manifest_file(p, Manifest(Path("wavs"), [ManifestEntry("x.wav", 5)]))
    monkeypatch.chdir(tmp_path)  # "wavs" does not exist here, so it is read relative to the manifest
    assert read_manifest(p).root == (tmp_path / "data" / "wavs").resolve()


def test_labels_round_trip_and_reject_newlines(tmp_path: Path) -> None:
    p = labels_path(tmp_path / "train.tsv")
    assert p == tmp_path / "train.labels"
    write_labels(p, ["yes", "no", "turn on the lights"])
    assert read_labels(p) == ["yes", "no", "turn on the lights"]
    with pytest.raises(ManifestError, match="newline"):
        write_labels(p, ["a\nb"])


def test_validate_manifest_finds_every_kind_of_problem(audio_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "train.tsv"
    write_manifest(audio_dir, out)
    write_labels(labels_path(out), ["x", "y", "z"])
    assert validate_manifest(out) == []

    text = out.read_text()
    out.write_text(text.replace("b.wav\t1600", "b.wav\t1601") + "gone.wav\t10\nno tab here\na.wav\t3200\n")
    problems = "\n".join(validate_manifest(out))
    assert "1601" in problems
    assert "missing file" in problems and "gone.wav" in problems
    assert "expected 'relpath<TAB>num_samples'" in problems
    assert "listed twice" in problems
    assert "3 labels for 5 manifest rows" in problems


def test_shard_range_covers_rows_contiguously() -> None:
    for n in (0, 1, 7, 10):
        for nshard in (1, 3, 4):
            ranges = [shard_range(n, nshard, r) for r in range(nshard)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    with pytest.raises(ManifestError, match="rank"):
        shard_range(10, 2, 2)


def test_module_entry_point_writes_and_validates(audio_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "m.tsv"
    assert main([str(audio_dir), str(out)]) == 0
    assert len(read_manifest(out)) == 3
    assert main(["--validate", str(out)]) == 0
    out.write_text(out.read_text() + "missing.wav\t1\n")
    assert main(["--validate", str(out)]) == 1
    assert "missing file" in capsys.readouterr().err


def test_runs_as_a_module_without_path_tricks(audio_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.tsv"
    proc = subprocess.run([sys.executable, "-m", "speechprompt.data_prep.manifest", str(audio_dir), str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "3 files" in proc.stdout and len(read_manifest(out)) == 3
