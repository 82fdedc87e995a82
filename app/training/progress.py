"""Where a run is: its progress (what a checkpoint carries besides weights), its checkpoints, and
what each step reports (the perf record and the log line)."""

from __future__ import annotations

import dataclasses
import os
import resource
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import exaforce
from exaforce import checkpoint
from exaforce.config import Config
from exaforce.model.potential import Potential
from exaforce.parallel.topology import Topology
from exaforce.training.ema import WeightAverage


@dataclass
class Progress:
    """What a checkpoint holds besides weights, optimizer state and RNG states."""

    step: int = 0                     # optimizer steps taken = global batches consumed (the sampler's
                                      # position) = the LR schedule's step
    skipped_steps: int = 0            # steps without an update (non-finite, run.nonfinite = "skip")
    layout: tuple[int, ...] = (0, 0, 0)   # (world, dp, ep[, pp, blocks per stage]) the coefficients below
                                          # were measured on (setup.calibration_layout)
    flop_coefficients: dict[str, float] = field(default_factory=dict)  # pipeline: this rank's stage's
    cost_coefficients: dict[str, float] = field(default_factory=dict)  # the sampler's deal


def peak_memory_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def resident_memory_bytes() -> int:
    """The process's resident memory now (Linux /proc/self/statm: pages), 0 where unknown."""
    try:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Checkpointer:
    """Writes the run's checkpoints (exaforce.checkpoint) and remembers the newest one of this
    trajectory, so a step already on disk is not written twice."""

    def __init__(self, cfg: Config, topo: Topology, model: Potential, optimizer: torch.optim.Optimizer,
                 newest: Path | None, average: WeightAverage | None = None):
        self.cfg, self.topo, self.model, self.optimizer, self.average = cfg, topo, model, optimizer, average
        self.run_dir = Path(cfg.run.out_dir)
        self.newest = newest

    def save(self, progress: Progress) -> Path:
        """Collective: checkpoint folder of `progress.step` (skipped when it is the newest already)."""
        if self.newest != checkpoint.step_folder(self.run_dir, progress.step):
            meta = {"step": progress.step, "config": self.cfg.to_dict(), "progress": dataclasses.asdict(progress),
                    "written_by": {"exaforce": exaforce.__version__, "torch": str(torch.__version__)}}
            with self.average.averaged() if self.average is not None else nullcontext():
                self.newest = checkpoint.save(self.run_dir, progress.step, self.model, self.optimizer, self.topo,
                                              meta, self.cfg.run.keep_checkpoints)
        return self.newest

    def export_model(self) -> Path:
        """Collective: rank 0 writes the newest checkpoint's whole model as one file beside it (what
        the ASE calculator, `exaforce predict` and fine-tuning read); returns its path."""
        path = self.newest.with_suffix(".pt")
        if self.topo.is_root:
            checkpoint.export_model(self.newest, path)
        self.topo.barrier()  # collective: nobody reports the file before it exists
        return path


def step_log_line(step: int, total: int, loss: float, seconds: float) -> str:
    return f"step {step:>5}/{total}  loss {loss:.4g}  {seconds * 1e3:.0f} ms"


def validation_log_lines(val: dict[str, dict[str, Any]]) -> list[str]:
    return [f"validation {head}: energy MAE {m['energy_mev_per_atom']:.1f} meV/atom, forces MAE "
            f"{m['forces_mev_per_a']:.1f} meV/Å ({m['structures']} structures)" for head, m in val.items()]
