"""Atomic file writes: the one helper every layer uses (policy signatures, slots, checkpoints).

A file is written under a unique temporary name in its own folder, flushed and
fsynced, renamed over the target (``os.replace``, atomic on POSIX and Windows) and
the folder fsynced, so a crash leaves either the old file or the new one, never a
torn one. A failed write removes its temporary file.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "fsync_dir", "write_atomic"]


def fsync_dir(path: Path) -> None:
    """Make a rename or creation inside folder ``path`` durable (no-op where unsupported)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path, *, mode: int | None = None) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that takes a path (e.g. safetensors).

    On a clean exit the file is fsynced, given ``mode`` (when set) and renamed over
    ``path``, and the folder fsynced; on an exception it is removed.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename, fsync folder)."""
    with atomic_path(path, mode=mode) as tmp, open(tmp, "wb") as f:
        f.write(data)
