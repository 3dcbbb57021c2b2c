"""The one atomic-write helper (layerfed.atomic): all or nothing, no temp files left."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from layerfed.atomic import atomic_path, write_atomic


def test_write_atomic_replaces_the_whole_file_and_leaves_no_temp(tmp_path: Path) -> None:
    """A second write replaces the first completely; only the target is left in the folder."""
    target = tmp_path / "state.json"
    write_atomic(target, b"old content that is longer")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_failed_writer_keeps_the_old_file_and_removes_its_temp(tmp_path: Path) -> None:
    """An exception inside atomic_path leaves the previous file untouched and no temp file."""
    target = tmp_path / "slot.safetensors"
    target.write_bytes(b"committed")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"committed"
    assert [p.name for p in tmp_path.iterdir()] == ["slot.safetensors"]


@pytest.mark.parametrize("mode", [0o600, 0o644])
def test_mode_is_applied_before_the_rename(tmp_path: Path, mode: int) -> None:
    """``mode`` sets the permissions the file has once it appears under its name."""
    target = tmp_path / "key.sig.json"
    write_atomic(target, b"{}", mode=mode)
    assert stat.S_IMODE(target.stat().st_mode) == mode
