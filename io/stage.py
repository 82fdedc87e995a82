"""Stage datasets onto node-local storage (NVMe) once per node, verified by sha256.

Why: thousands of ranks reading the same dataset from the parallel file system is the slowest
part of start-up at scale; one copy per node, then local reads, is not. Only the node leader
(rank 0 of the node communicator) touches the files; the others wait in the result broadcast, so
a failure on the leader reaches every rank of the node as a StageError instead of a hang.

Two jobs sharing a node may stage the same dataset into the same folder at the same moment: each
dataset is staged under an exclusive lock, so the second waits for the
first and then finds the copy present and verifies it instead of racing it. The lock is an flock on
the destination folder itself (one stage at a time per folder; no lock file is left behind).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from exaforce.io.atomic import remove, replace_path, sibling

if TYPE_CHECKING:
    from mpi4py import MPI

CHUNK_BYTES = 8 << 20
Tree = dict[str, tuple[int, str]]  # relative posix path -> (size in bytes, sha256 hex digest)
Progress = Callable[[str, int, int], None]  # (what: "copying X", bytes done, bytes in all)


def _no_progress(what: str, done: int, total: int) -> None:
    pass


class StageError(RuntimeError):
    """Staging failed; the message names the dataset file or directory."""


def stage_datasets(paths: list[Path], dest: Path, node_comm: "MPI.Intracomm | None",
                   log: Callable[[str], None] = print, fallback: bool = False,
                   progress: Progress = _no_progress) -> list[Path]:
    """Copy every dataset (a file or a .bp directory) to dest/<basename>, once per node.

    `node_comm` is the communicator of the ranks on one node (None: a single process, which is
    its own leader). The leader first checks that what must be copied fits in dest's free space,
    skips datasets already present and identical (sizes, then sha256 of every file), else copies
    to a temp name, verifies, renames into place. Every rank returns the same staged paths, or
    raises the same StageError — or, with `fallback`, warns and returns the source paths (the job
    then reads from the shared file system).
    """
    leader = node_comm is None or node_comm.Get_rank() == 0
    outcome: tuple[bool, list[str] | str] = (True, [])
    if leader:
        outcome = _stage_all([Path(p) for p in paths], Path(dest), log, progress)
    if node_comm is not None:
        # Collective: the non-leaders wait here until the leader has finished (or failed).
        outcome = node_comm.bcast(outcome, root=0)
    ok, payload = outcome
    if not ok:
        if fallback:
            log(f"stage: WARNING: {payload}; falling back to the shared file system (reading the sources)")
            return [Path(p) for p in paths]
        raise StageError(payload)
    return [Path(p) for p in payload]


def _check_space(paths: list[Path], dest: Path) -> None:
    """Fail before copying anything when the datasets that still need a copy do not fit."""
    needed = {src: _size(src) for src in paths
              if src.exists() and not ((dest / src.name).exists() and _same_sizes(src, dest / src.name))}
    probe = dest if dest.exists() else next(p for p in dest.parents if p.exists())
    free = shutil.disk_usage(probe).free
    if sum(needed.values()) > free:
        biggest = max(needed, key=needed.get)
        raise StageError(f"{biggest}: the datasets to stage need {sum(needed.values()) / 1e6:.1f} MB "
                         f"({biggest.name}: {needed[biggest] / 1e6:.1f} MB) but {dest} has {free / 1e6:.1f} MB free")


def _stage_all(paths: list[Path], dest: Path, log: Callable[[str], None],
               progress: Progress) -> tuple[bool, list[str] | str]:
    """(True, staged paths) or (False, error message naming the dataset); never raises."""
    staged = []
    try:
        _check_space(paths, dest)
    except StageError as err:
        return False, str(err)
    for src in paths:
        try:
            staged.append(str(_stage_one(src, dest, log, progress)))
        except Exception as err:  # noqa: BLE001 — anything here must reach the other ranks
            message = str(err) if isinstance(err, StageError) else (
                f"{src}: staging to {dest} failed: {type(err).__name__}: {err}")
            return False, message
    return True, staged


def sha256_tree(path: Path, advance: Callable[[int], None] = lambda nbytes: None) -> Tree:
    """Size and sha256 of every file under `path`, keyed by relative path ('.' when `path` is a file);
    `advance` hears of every chunk read."""
    path = Path(path)
    if path.is_file():
        return {".": _hash_file(path, advance)}
    return {f.relative_to(path).as_posix(): _hash_file(f, advance) for f in _files(path)}


@contextmanager
def folder_lock(dest: Path, log: Callable[[str], None]) -> Iterator[None]:
    """Holds the exclusive staging lock of the folder `dest` (an flock on the folder itself: no lock
    file to leave behind), waiting with a message while another process holds it."""
    fd = os.open(dest, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"stage: waiting for another stage into {dest} (another job on this node?)")
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:  # no locks on this file system (NFS emulates flock on writable files only)
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF):
                raise
            log(f"stage: WARNING: {dest} cannot be locked ({err.strerror}); another job staging there "
                f"at the same moment would race this one")
        yield
    finally:
        os.close(fd)  # releases the lock


def _stage_one(src: Path, dest: Path, log: Callable[[str], None], progress: Progress) -> Path:
    """Stage one dataset on the leader, under the target's lock; returns its staged path."""
    if not src.exists():
        raise StageError(f"{src}: source dataset not found")
    dest.mkdir(parents=True, exist_ok=True)
    with folder_lock(dest, log):
        return _stage_unlocked(src, dest, log, progress)


def _counter(progress: Progress, what: str, total: int) -> Callable[[int], None]:
    """advance(nbytes) → progress(what, bytes so far, total)."""
    done = 0

    def advance(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        progress(what, done, total)
    return advance


def _stage_unlocked(src: Path, dest: Path, log: Callable[[str], None], progress: Progress) -> Path:
    target = dest / src.name
    size = _size(src)
    if target.exists() and _same_sizes(src, target):
        t0 = time.perf_counter()
        verify = _counter(progress, f"verifying {target.name} against its source", 2 * size)
        source_tree = sha256_tree(src, verify)
        if sha256_tree(target, verify) == source_tree:
            log(f"stage: {target} already present, {len(source_tree)} file(s) match by size and sha256 "
                f"({time.perf_counter() - t0:.2f} s to verify); skipped")
            return target
        log(f"stage: {target} differs from {src} (sha256); re-copying")
    tmp = sibling(target, "stage")
    try:
        t0 = time.perf_counter()
        source_tree = _copy_tree(src, tmp, _counter(progress, f"copying {src.name}", size))
        seconds = time.perf_counter() - t0
        if sha256_tree(tmp, _counter(progress, f"verifying the copy of {src.name}", size)) != source_tree:
            raise StageError(f"{src}: copy at {tmp} does not match the source (size or sha256)")
        replace_path(tmp, target)
    except BaseException:
        remove(tmp)
        raise
    nbytes = sum(size for size, _ in source_tree.values())
    log(f"stage: copied {src} -> {target}: {nbytes / 1e6:.1f} MB in {seconds:.2f} s "
        f"({nbytes / 1e6 / max(seconds, 1e-9):.1f} MB/s), {len(source_tree)} file(s) verified by sha256")
    return target


def _files(root: Path) -> list[Path]:
    """Every regular file under `root`, in a stable order."""
    return sorted(p for p in root.rglob("*") if p.is_file())


def _size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    return sum(f.stat().st_size for f in ([path] if path.is_file() else _files(path)))


def _same_sizes(src: Path, target: Path) -> bool:
    """Cheap pre-check before hashing: same file names and sizes."""
    if src.is_file() != target.is_file():
        return False
    if src.is_file():
        return src.stat().st_size == target.stat().st_size
    sizes = [{f.relative_to(root).as_posix(): f.stat().st_size for f in _files(root)} for root in (src, target)]
    return sizes[0] == sizes[1]


def _hash_file(path: Path, advance: Callable[[int], None]) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
            advance(len(chunk))
    return size, digest.hexdigest()


def _copy_file(src: Path, dst: Path, advance: Callable[[int], None]) -> tuple[int, str]:
    """Copy and hash the source in one pass (the source is read once, from the slow file system)."""
    digest, size = hashlib.sha256(), 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(CHUNK_BYTES):
            digest.update(chunk)
            fout.write(chunk)
            size += len(chunk)
            advance(len(chunk))
        fout.flush()
        os.fsync(fout.fileno())
    shutil.copymode(src, dst)
    return size, digest.hexdigest()


def _copy_tree(src: Path, dst: Path, advance: Callable[[int], None]) -> Tree:
    """Copy a file or a directory tree to `dst`; returns the source's sha256_tree as read while copying."""
    if src.is_file():
        return {".": _copy_file(src, dst, advance)}
    dst.mkdir()
    tree = {}
    for f in _files(src):
        rel = f.relative_to(src)
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        tree[rel.as_posix()] = _copy_file(f, dst / rel, advance)
    return tree
