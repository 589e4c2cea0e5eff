"""Atomic writes leave either the old file or the new one, never a partial file or a stray temp file."""

from __future__ import annotations

from pathlib import Path

import pytest

from speechprompt.fileio import atomic_open, read_json, write_json


def test_failed_write_keeps_old_content(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    write_json(path, {"v": 1})
    with pytest.raises(RuntimeError), atomic_open(path, "w") as f:
        f.write('{"v": 2, "trunc')
        raise RuntimeError("killed mid-write")
    assert read_json(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_creates_parent_dirs(tmp_path: Path) -> None:
    write_json(tmp_path / "a" / "b" / "c.json", [1, 2])
    assert read_json(tmp_path / "a" / "b" / "c.json") == [1, 2]
