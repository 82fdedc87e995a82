"""Fault injection for tests/mpi/test_faults.py: `mpiexec -n K fault_ranks.py FAULT RANK STEP train ARGS…`
runs the real `exaforce train ARGS…` (the CLI entry point) in which rank RANK suffers FAULT:

  sigterm    sends itself SIGTERM right after step STEP (a scheduler's warning that reached one rank)
  nan        a NaN energy label in its share of step STEP (a bad sample the loader let through)
  raise      a RuntimeError during step STEP (a bug or a device error on one rank)
  hang       sleeps for an hour in step STEP (hung I/O, a peer lost without the launcher noticing)
  disk-full  its expert shard of the STEP-th checkpoint fails half-way through with ENOSPC

Faults are injected from outside, at the boundaries where they arise, never inside the step:
the production `train_step` runs untouched. The Watchdog's beat names the step that starts;
the step's batches come from `TrainingData.batch` (the loader: a NaN label, an exception, a hang
there); its perf record (`PerfLogWriter.step`) marks its end (the signal), and
`exaforce.checkpoint._write_part` writes the checkpoint parts (the full disk). Nothing in exaforce
knows about them. The moment of injection is printed to stderr as `fault: <name> at <unix time>`.
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
from exaforce.cli import main
from exaforce.faults import Watchdog
from exaforce.io.atomic import write_file_atomically
from exaforce.perf.log import PerfLogWriter
from exaforce.training.data import TrainingData


def announce(what: str) -> None:
    print(f"fault: {what} at {time.time():.6f}", file=sys.stderr, flush=True)


def inject(fault: str, rank: int, step: int) -> None:
    if MPI.COMM_WORLD.Get_rank() != rank:
        return
    state = {"step": 0, "first_batch": False, "expert_parts": 0}

    real_beat = Watchdog.beat

    def beat(self, where: str) -> None:
        state["step"] = int(where.split()[1]) if where.startswith("step ") else 0  # 0: between steps
        state["first_batch"] = state["step"] == step
        real_beat(self, where)

    real_batch = TrainingData.batch

    def batch(self, global_indices):
        bad = state["first_batch"]
        state["first_batch"] = False
        if bad and fault == "raise":
            announce(f"RuntimeError in step {step} on rank {rank}")
            raise RuntimeError(f"injected failure in step {step}")
        if bad and fault == "hang":
            announce(f"hang in step {step} on rank {rank}")
            time.sleep(3600)
        graphs = real_batch(self, global_indices)
        if bad and fault == "nan":
            graphs.energy_G[0] = float("nan")
            announce(f"NaN energy label in step {step} on rank {rank}")
        return graphs

    real_record = PerfLogWriter.step

    def record(self, **fields) -> None:
        real_record(self, **fields)
        if fault == "sigterm" and fields["step"] == step:
            announce(f"SIGTERM to rank {rank} after step {step}")
            os.kill(os.getpid(), signal.SIGTERM)

    real_write = exaforce.checkpoint._write_part

    def write_part(folder, name, state_dict):
        if fault == "disk-full" and name.startswith("experts-"):
            state["expert_parts"] += 1
            if state["expert_parts"] == step:
                def half_then_full(f):
                    buffer = io.BytesIO()
                    torch.save(state_dict, buffer)
                    f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
                    announce(f"ENOSPC half-way through {name} on rank {rank}")
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / name))

                write_file_atomically(folder / name, half_then_full)
        return real_write(folder, name, state_dict)

    Watchdog.beat = beat
    TrainingData.batch = batch
    PerfLogWriter.step = record
    exaforce.checkpoint._write_part = write_part


if __name__ == "__main__":
    inject(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    main(sys.argv[4:])
