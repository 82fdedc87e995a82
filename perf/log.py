"""Per-rank JSONL performance logs: one header record, one record per step, one end record.

Each rank appends to RUN_DIR/perf/rank-RRRRR.jsonl and flushes every record, so a run that
crashes half-way leaves every complete line readable. A resumed run appends to the same file: a
new header (with `resumed_from_step`) starts its segment. The schema is in perf/SCHEMA.md.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any, TextIO

SCHEMA_VERSION = 1
STEP_TIME_KEYS = ("data", "forward", "force_backward", "param_backward", "comm", "optimizer")
# "routing" (routing-class count exchange, its own slice of the step) and "alltoall" (expert dispatch,
# a part of forward + force_backward + param_backward, not an extra slice): both ~0 without MoE; with
# comm.sync_before_reduce: "imbalance" (the barrier before the reduction, its own slice); with pipeline
# stages: "pp_wait" (waiting for the neighbouring stages' messages, a part of the three, not an extra slice);
# with graph parallelism: "gp_shard" (partition and halo subgraphs, its own slice) and "gp_sum" (the GP
# group's Allreduce of energies and gradients, waiting for the slowest peer included: its own slice), and
# with parallel.gp_halo = "exchange" "gp_halo" (the per-block halo all-to-alls, a part of the three).
OPTIONAL_TIME_KEYS = ("routing", "alltoall", "imbalance", "pp_wait", "gp_shard", "gp_sum", "gp_halo")


def rank_log_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / "perf" / f"rank-{rank:05d}.jsonl"


def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("torch", "numpy", "mpi4py", "adios2", "ase", "vesin"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = str(getattr(module, "__version__", "?"))
    return versions


class PerfLogWriter:
    """Writes records for one rank; every record is one flushed line. A new run truncates the file;
    a resumed one (`append=True`) keeps it, dropping a last line torn by the crash it resumes from."""

    def __init__(self, run_dir: Path, rank: int, append: bool = False):
        self.path = rank_log_path(run_dir, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if append and self.path.exists():
            _drop_torn_last_line(self.path)
        self._file: TextIO = open(self.path, "a" if append else "w", encoding="utf-8")

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def header(self, *, rank: int, world_size: int, config: dict, topology: dict,
               machine: dict, flop_coefficients: dict[str, float], resumed_from_step: int | None = None) -> None:
        """`resumed_from_step`: the checkpoint's step when this segment continues an earlier run."""
        record = {
            "kind": "header", "schema": SCHEMA_VERSION, "rank": rank, "world_size": world_size,
            "hostname": socket.gethostname(), "pid": os.getpid(), "unix_time": time.time(),
            "config": config, "topology": topology, "machine": machine,
            "versions": software_versions(), "flop_coefficients": flop_coefficients,
        }
        if resumed_from_step is not None:
            record["resumed_from_step"] = resumed_from_step
        self._write(record)

    def step(self, *, step: int, epoch: int, times: dict[str, float], loss_sum: dict[str, float],
             structures: int, atoms: int, edges: int, angles: int, flops: float,
             peak_mem_bytes: int, lr: float, extra: dict | None = None) -> None:
        """`extra`: the optional fields of SCHEMA.md (sampler cost; MoE aux loss and expert load)."""
        missing = set(STEP_TIME_KEYS) - set(times)
        if missing:
            raise ValueError(f"perf step record lacks times {sorted(missing)}")
        record = {
            "kind": "step", "step": step, "epoch": epoch,
            "times": {k: times[k] for k in STEP_TIME_KEYS + OPTIONAL_TIME_KEYS if k in times},
            "total_time": times.get("total", sum(times[k] for k in STEP_TIME_KEYS)),
            "loss_sum": loss_sum, "structures": structures, "atoms": atoms, "edges": edges,
            "angles": angles, "flops": flops, "peak_mem_bytes": peak_mem_bytes, "lr": lr,
        }
        self._write({**record, **(extra or {})})

    def end(self, *, steps: int, wall_s: float, skipped_steps: int = 0) -> None:
        self._write({"kind": "end", "steps": steps, "wall_s": wall_s, "skipped_steps": skipped_steps})

    def close(self) -> None:
        self._file.close()


def _drop_torn_last_line(path: Path) -> None:
    """Cut a file after its last newline: a record half-written when the process died is not a record,
    and appending after it would glue the next record onto it."""
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        position = end
        while position > 0:  # backwards in chunks: the log of a long run is large
            start = max(0, position - 65536)
            f.seek(start)
            chunk = f.read(position - start)
            if position == end and chunk.endswith(b"\n"):
                return
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                f.truncate(start + newline + 1)
                return
            position = start
        f.truncate(0)
