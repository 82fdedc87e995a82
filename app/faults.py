"""How a run ends when something goes wrong: scheduler signals, non-finite steps, hung or dead ranks.

- A scheduler's warning (SIGTERM, or SIGUSR1 from `#SBATCH --signal=USR1@120`) only sets a flag;
  at the next step boundary the ranks agree on it (one tiny all-reduce per step), write a
  checkpoint and all exit with REQUEUE_EXIT_CODE, which the job templates resubmit on.
- A non-finite loss or gradient norm under `run.nonfinite = "stop"` ends with NONFINITE_EXIT_CODE
  after a checkpoint of the last good state (never requeued: the same batch would fail again).
- An exception on one rank is reported with its rank and the job is aborted (`abort_job`), so the
  other ranks never wait in a collective for it; a rank that makes no progress for
  `run.step_timeout_s` (hung I/O, a peer lost without the launcher noticing) is aborted by the
  Watchdog. A rank killed outright is the launcher's to notice: MPICH's mpiexec (hydra) and
  `srun --kill-on-bad-exit` tear the job down.
- Every abort says why twice: on stderr (flushed, then a short grace before MPI_Abort, because the
  launcher drops output it has not yet forwarded when the job is torn down) and in RUN/ABORTED
  (one line per rank that reports: time, rank, reason; fsynced before the abort).

Nothing here imports torch, so job-template tools can read the exit codes cheaply.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

REQUEUE_EXIT_CODE = 75      # EX_TEMPFAIL (sysexits.h): checkpoint written after a scheduler signal; resubmit
NONFINITE_EXIT_CODE = 3     # stopped on a non-finite loss or gradient (run.nonfinite = "stop"); do not resubmit
CRASH_EXIT_CODE = 1         # an exception on some rank: the job was aborted
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
ABORTED_FILE = "ABORTED"    # in the run folder: why the job was aborted


class RunStopped(Exception):
    """Training ended early on a decision every rank took together; the process exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """SIGTERM/SIGUSR1 handlers that only record the signal (a handler may run between any two
    bytecodes, so it must not write checkpoints or enter MPI). Installed by the entry point for
    the whole run; `with StopSignals() as signals:` restores the previous handlers afterwards."""

    def __init__(self, install: bool = True):
        self.received = 0  # the last signal number received, 0: none
        self._install = install
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if self._install:
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def agreed(self, topo: Any) -> str | None:
        """Collective (every rank, every step): the name of the signal any rank received, else None."""
        signum = topo.max(self.received)  # collective: 8 bytes
        return signal.Signals(signum).name if signum else None


class Watchdog:
    """A thread that aborts the whole job when the main thread has not called `beat()` for
    `timeout_s` seconds (0 disables it). mpi4py releases the GIL inside MPI calls, so the thread
    runs while the main thread waits in a collective for a rank that never comes."""

    def __init__(self, world: Any, timeout_s: float, run_dir: Path | None = None):
        self.world, self.timeout_s, self.run_dir = world, timeout_s, run_dir
        self.where, self._last = "start-up", time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="exaforce-watchdog", daemon=True)

    def __enter__(self) -> "Watchdog":
        if self.timeout_s > 0:
            self.beat("start")
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()

    def beat(self, where: str) -> None:
        """Progress: the clock restarts; `where` names what runs next (for the abort message)."""
        self.where, self._last = where, time.monotonic()

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.timeout_s / 4)):
            stalled = time.monotonic() - self._last
            if stalled > self.timeout_s:
                report(f"rank {self.world.Get_rank()}: no progress for {stalled:.0f} s in {self.where} "
                       f"(run.step_timeout_s = {self.timeout_s:g}): a rank is hung or lost; aborting the job",
                       self.run_dir)
                abort_world(self.world, CRASH_EXIT_CODE)


ABORT_GRACE_S = 2.0


def report(reason: str, run_dir: Path | None) -> None:
    """The reason for an abort, on stderr (flushed) and appended to RUN/ABORTED (fsynced): the job's
    stderr may lose it when the abort tears the launcher down, the file survives."""
    print(f"exaforce: error: {reason}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    if run_dir is None:
        return
    try:
        with open(Path(run_dir) / ABORTED_FILE, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {reason}\n")  # one write: lines of two ranks never tear
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        print(f"exaforce: (could not record the reason in {run_dir / ABORTED_FILE}: {err.strerror})",
              file=sys.stderr, flush=True)


def abort_world(world: Any, code: int) -> None:
    """MPI_Abort after a short, bounded grace: the launcher forwards output asynchronously and drops
    what it has not forwarded when the abort tears the job down, so the message just printed would
    otherwise be lost now and then (seen with mpich's hydra under load); the other ranks' watchdogs
    use the grace to report too."""
    time.sleep(ABORT_GRACE_S)
    world.Abort(code)


def abort_job(world: Any, exc: BaseException, run_dir: Path | None = None) -> None:
    """Report an exception with this rank's number and abort every rank of the job (MPI_Abort), so
    none is left waiting in a collective for this one. With one rank: just exit."""
    rank = world.Get_rank()
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    sys.stderr.write("".join(f"[rank {rank}] {line}" for text in lines for line in text.splitlines(True)))
    report(f"rank {rank}: {type(exc).__name__}: {exc}; aborting all {world.Get_size()} rank(s)", run_dir)
    if world.Get_size() > 1:
        abort_world(world, CRASH_EXIT_CODE)
    raise SystemExit(CRASH_EXIT_CODE)
