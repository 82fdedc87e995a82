"""Fault injection for tests/mpi/test_faults.py: `mpiexec -n K fault_ranks.py FAULT RANK STEP train ARGS…`
runs the real `exaforce train ARGS…` (the CLI entry point) in which rank RANK suffers FAULT:

  sigterm    sends itself SIGTERM right after step STEP (a scheduler's warning that reached one rank)
  nan        a NaN energy label in its share of step STEP (a bad sample the loader let through)
  raise      a RuntimeError during step STEP (a bug or a device error on one rank)
  hang       sleeps for an hour in step STEP (hung I/O, a peer lost without the launcher noticing)
  disk-full  its expert shard of the STEP-th checkpoint fails half-way through with ENOSPC

Faults are injected from outside by wrapping functions of the real modules (exaforce.train.train_step,
exaforce.checkpoint._write_part); nothing in exaforce knows about them. The moment of injection is
printed to stderr as `fault: <name> at <unix time>`.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import sys
import time

import torch
from mpi4py import MPI

import exaforce.checkpoint
import exaforce.train
from exaforce.cli import main
from exaforce.io.atomic import write_file_atomically


def announce(what: str) -> None:
    print(f"fault: {what} at {time.time():.6f}", file=sys.stderr, flush=True)


def inject(fault: str, rank: int, step: int) -> None:
    if MPI.COMM_WORLD.Get_rank() != rank:
        return
    real_step = exaforce.train.train_step
    calls = {"steps": 0, "expert_parts": 0}

    def train_step(model, micro_batches, *args, **kwargs):
        calls["steps"] += 1
        if calls["steps"] == step:
            if fault == "nan":
                micro_batches[0].energy_G[0] = float("nan")
                announce(f"NaN energy label in step {step} on rank {rank}")
            elif fault == "raise":
                announce(f"RuntimeError in step {step} on rank {rank}")
                raise RuntimeError(f"injected failure in step {step}")
            elif fault == "hang":
                announce(f"hang in step {step} on rank {rank}")
                time.sleep(3600)
        result = real_step(model, micro_batches, *args, **kwargs)
        if fault == "sigterm" and calls["steps"] == step:
            announce(f"SIGTERM to rank {rank} after step {step}")
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    real_write = exaforce.checkpoint._write_part

    def write_part(folder, name, state):
        if fault == "disk-full" and name.startswith("experts-"):
            calls["expert_parts"] += 1
            if calls["expert_parts"] == step:
                def half_then_full(f):
                    buffer = io.BytesIO()
                    torch.save(state, buffer)
                    f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
                    announce(f"ENOSPC half-way through {name} on rank {rank}")
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / name))

                write_file_atomically(folder / name, half_then_full)
        return real_write(folder, name, state)

    exaforce.train.train_step = train_step
    exaforce.checkpoint._write_part = write_part


if __name__ == "__main__":
    inject(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    main(sys.argv[4:])
