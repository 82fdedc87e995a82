"""The one place benchmarks start processes: where `mpiexec` and `exaforce` are, and how a worker
or a launch runs with its output captured and a failure raised with its exit status and stderr.

Benchmarks measure in subprocesses (one model per process, R ranks under mpiexec), so that one
measurement's memory, threads or MPI state never leaks into the next.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

STDERR_TAIL = 3000  # characters of a failed process's stderr quoted in the error


def mpiexec() -> str:
    """The mpiexec on PATH, else the one beside this Python (the mpich wheel's, in a virtualenv)."""
    return shutil.which("mpiexec") or str(Path(sys.executable).parent / "mpiexec")


def exaforce_command(*args: str) -> list[str]:
    """`exaforce ARGS…` from this Python's environment (not whichever one is on PATH)."""
    return [str(Path(sys.executable).parent / "exaforce"), *args]


def module_command(module: str, *args: str) -> list[str]:
    """`python -m MODULE ARGS…` with this Python: a benchmark's worker entry point."""
    return [sys.executable, "-m", module, *args]


def on_ranks(ranks: int, command: list[str]) -> list[str]:
    """`command` launched on `ranks` MPI ranks."""
    return [mpiexec(), "-n", str(ranks), *command]


def environment(**defaults: str) -> dict[str, str]:
    """This process's environment over `defaults`: a value the user already set wins."""
    return {**defaults, **os.environ}


def launch(command: list[str], what: str, env: dict[str, str]) -> str:
    """Runs `command` to the end with its output captured and returns its stdout; raises
    RuntimeError naming `what`, the exit status and the end of stderr when it fails."""
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-STDERR_TAIL:]}")
    return proc.stdout


def launch_json(command: list[str], what: str, env: dict[str, str]) -> dict:
    """launch() of a worker whose last line of stdout is one JSON object: that object."""
    return json.loads(launch(command, what, env).strip().splitlines()[-1])
