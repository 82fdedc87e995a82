"""Crash-safe writes: build under a hidden sibling name, fsync, rename into place.

Why: a crash or kill mid-write must leave the old content or the new, never a torn file or a
half-written dataset that opens. A rename within one directory is atomic on POSIX; fsyncing the
data before the rename, and the parent directory after it, makes the result survive power loss.
Used by every writer in the project (extxyz, BP datasets, staging, checkpoints).

A full file system (ENOSPC, or EDQUOT: the quota) is DiskFullError, one line naming the path:
the temporary is removed, the old content stays, and the command exits 2 instead of dumping a
writer's internals (torch.save reports it as "unexpected pos", ADIOS2 aborts the process).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NEARLY_FULL_BYTES = 1 << 20  # a write that failed with less than this free failed for want of space


class DiskFullError(Exception):
    """No room to write `path`; the message says where and how much."""

    def __init__(self, path: Path, detail: str = ""):
        free = free_bytes(Path(path).parent)
        super().__init__(f"{path}: no space left on device{detail}"
                         + (f" ({_megabytes(free)} free there)" if free is not None else ""))
        self.path = Path(path)


def free_bytes(folder: Path) -> int | None:
    """Bytes an unprivileged write can still use in `folder`'s file system (None: unknown)."""
    for candidate in (Path(folder), *Path(folder).parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def is_disk_full(err: BaseException, folder: Path | None = None) -> bool:
    """Whether a write failed for want of space: ENOSPC or EDQUOT, or any error of a writer that
    hides the errno (torch.save) while `folder`'s file system is (nearly) full."""
    if isinstance(err, OSError) and err.errno in NO_SPACE_ERRNOS:
        return True
    free = free_bytes(folder) if folder is not None else None
    return isinstance(err, (OSError, RuntimeError)) and free is not None and free < NEARLY_FULL_BYTES


def check_free_space(path: Path, needed: int) -> None:
    """DiskFullError before a write of about `needed` bytes to `path` that cannot fit (for writers
    that cannot fail cleanly half-way, like ADIOS2's)."""
    free = free_bytes(Path(path).parent)
    if free is not None and free < needed:
        raise DiskFullError(path, f": writing it needs about {_megabytes(needed)}")


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.3g} MB"


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
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp's 0600 would hide a shared model from the group
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(err, path.parent):
            raise DiskFullError(path) from None
        raise
    fsync_dir(path.parent)


def umask() -> int:
    """The process's umask, read without changing it (os.umask can only set it, racing other threads)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        current = os.umask(0o022)
        os.umask(current)
        return current


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
