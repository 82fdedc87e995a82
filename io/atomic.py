"""Crash-safe writes: build under a hidden sibling name, fsync, rename into place.

Why: a crash or kill mid-write must leave the old content or the new, never a torn file or a
half-written dataset that opens. A rename within one directory is atomic on POSIX; fsyncing the
data before the rename, and the parent directory after it, makes the result survive power loss.
Used by every writer in the project (extxyz, BP datasets, staging, checkpoints).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def sibling(path: Path, tag: str) -> Path:
    """A hidden, unique name next to `path` (same file system, so a rename to `path` is atomic)."""
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def fsync_dir(directory: Path) -> None:
    """Make a rename durable (the directory entry lives in the parent)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """Flush every file under `directory` and the directory itself, so a rename publishes durable data."""
    for item in directory.rglob("*"):
        if item.is_file():
            with open(item, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(directory)


def write_file_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write` on a temp file in `path`'s directory, fsync, rename over `path`.

    `path` holds its old content or the new, never a partial file; the temp file is removed on
    any failure (KeyboardInterrupt included).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def replace_path(tmp: Path, path: Path) -> None:
    """Rename the finished `tmp` (file or directory) to `path`, then make the rename durable.

    An existing `path` is moved aside first and restored if the final rename fails, so `path`
    never goes missing; once the new one is in place the old one is deleted.
    """
    if not path.exists():
        os.rename(tmp, path)
    else:
        old = sibling(path, "old")
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(old, path)
            raise
        remove(old)
    fsync_dir(path.parent)


def remove(path: Path) -> None:
    """Delete a file or directory tree if present; best effort (used for temp and superseded copies)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
