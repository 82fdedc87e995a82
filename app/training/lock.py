"""One run per run folder: rank 0 holds an exclusive lock on RUN/.lock for the run's whole life.

Two `exaforce train` into one run.out_dir would interleave their checkpoints and perf logs (a
checkpoint of one run, a perf-log header of the other, torn lines). The lock is an flock(2) on an
open file, so it goes away with the process however it ends (exit, crash, kill -9): a stale lock
never blocks a resubmitted job. flock works on local disks, on NFS (as a POSIX lock) and on Lustre
mounted with -o flock; a file system without locks (ENOLCK, EOPNOTSUPP, or ENOSYS: Lustre without
flock) gets a warning and no lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import IO, Callable

from exaforce.config import ConfigError
from exaforce.parallel.topology import Topology

LOCK_FILE = ".lock"


class RunFolderLock:
    """Held from `acquire()` (collective: every rank goes on, or every rank raises ConfigError with
    the reason: another run holds the folder, the folder cannot be written) to the end of the
    `with` block. The trainer acquires it once its inputs are known good and before it writes
    anything, so a run refused for bad input leaves no run folder behind."""

    def __init__(self, run_dir: Path, topo: Topology, log: Callable[[str], None]):
        self.run_dir, self.topo, self.log = Path(run_dir), topo, log
        self._file: IO[str] | None = None
        self._created = False  # the lock made the run folder

    def __enter__(self) -> RunFolderLock:
        return self

    def acquire(self) -> None:
        problem = self._lock() if self.topo.is_root else None
        problem = self.topo.from_root(problem)  # collective: everybody stops, or nobody
        if problem is not None:
            raise ConfigError(problem)

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()  # releases the lock
            self._file = None
            if self._created and [p.name for p in self.run_dir.iterdir()] == [LOCK_FILE]:
                (self.run_dir / LOCK_FILE).unlink()  # a run that stopped before writing anything leaves no folder
                self.run_dir.rmdir()

    def _lock(self) -> str | None:
        """Takes the lock (rank 0); the reason it cannot, or None."""
        path = self.run_dir / LOCK_FILE
        try:
            self._created = not self.run_dir.exists()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            lock_file = open(path, "a+", encoding="utf-8")
        except OSError as err:
            return f"run.out_dir = {self.run_dir}: cannot write there ({err.strerror or err})"
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "holder unknown"
            lock_file.close()
            return (f"run.out_dir = {self.run_dir} is in use by another exaforce train ({holder}); wait for it "
                    f"to end, or train into another run.out_dir")
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # Lustre mounted without flock: ENOSYS
                lock_file.close()
                return f"run.out_dir = {self.run_dir}: cannot lock {path} ({err.strerror or err})"
            self.log(f"warning: {path}: this file system has no locks ({err.strerror}); nothing stops a second "
                     f"run from writing into {self.run_dir}")
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
        lock_file.flush()
        self._file = lock_file
        return None
