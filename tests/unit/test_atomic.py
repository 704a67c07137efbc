"""Atomic writes: content, permissions from the umask, no temporary left behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mc2sim._atomic import write_atomic


def test_text_and_bytes_round_trip(tmp_path: Path) -> None:
    text_path = write_atomic(tmp_path / "a.txt", "héllo\r\nworld")
    assert text_path.read_bytes() == "héllo\r\nworld".encode()
    bytes_path = write_atomic(tmp_path / "b.bin", b"\x00\x89PNG")
    assert bytes_path.read_bytes() == b"\x00\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin"]


def test_permissions_follow_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        path = write_atomic(tmp_path / "x.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_replaces_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_text("old")
    write_atomic(path, "new")
    assert path.read_text() == "new"


def test_missing_folder_raises_unless_parents(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "no" / "f.txt", "x")
    path = write_atomic(tmp_path / "no" / "f.txt", "x", parents=True)
    assert path.read_text() == "x"


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(TypeError):
        write_atomic(path, 123)  # type: ignore[arg-type]
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
