"""What a person follows while a run goes on: the log line's rates and ETA, RUN/metrics.csv and,
with `run.tensorboard = true`, the same values as TensorBoard scalars in RUN/tensorboard.

The perf logs (one JSON line per rank and step) are for `exaforce perf report`; metrics.csv is the
run's learning curve as one flat table that a spreadsheet, pandas or a plotting tool reads as it
is: one row per step (global values, written by rank 0), validation columns per head filled on the
steps that validated; wall_s counts from the segment's first step (0 again after a resume). A
resumed run keeps the rows up to its checkpoint and appends (TensorBoard: events after the
checkpoint's step are purged).
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOSS_TERMS = ("energy", "forces", "stress")
METRICS_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"


def metrics_columns(heads: tuple[str, ...]) -> list[str]:
    return (["step", "epoch", "wall_s", "lr", "loss", *(f"loss_{t}" for t in LOSS_TERMS), "grad_norm", "atoms_per_s"]
            + [f"val_{h}_{q}" for h in heads for q in ("energy_mev_per_atom", "forces_mev_per_a")])


class MetricsFile:
    """RUN/metrics.csv, written by rank 0 only, flushed every row (readable while the run goes on).

    A resumed run (`resumed_at`: its checkpoint's step) keeps the rows up to that step and appends:
    steps an interrupted segment took after its last checkpoint are taken again and replace theirs."""

    def __init__(self, run_dir: Path, heads: tuple[str, ...], resumed_at: int | None = None,
                 tensorboard: bool = False):
        self.path = Path(run_dir) / METRICS_FILE
        self.columns = metrics_columns(heads)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = self._rows_through(resumed_at) if resumed_at is not None and self.path.exists() else None
        self._file = open(self.path, "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns, extrasaction="ignore")
        self._writer.writeheader()
        for row in kept or []:
            self._writer.writerow(row)
        self._file.flush()
        self._board = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._board = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR),
                                        purge_step=None if resumed_at is None else resumed_at + 1)

    def _rows_through(self, step: int) -> list[dict[str, str]]:
        with open(self.path, newline="") as f:
            return [row for row in csv.DictReader(f) if row.get("step", "").isdigit() and int(row["step"]) <= step]

    def row(self, values: dict[str, Any], val: dict[str, dict[str, float]] | None = None) -> None:
        row = dict(values)
        for head, m in (val or {}).items():
            row[f"val_{head}_energy_mev_per_atom"] = m["energy_mev_per_atom"]
            row[f"val_{head}_forces_mev_per_a"] = m["forces_mev_per_a"]
        self._writer.writerow({k: _cell(row.get(k)) for k in self.columns})
        self._file.flush()
        if self._board is not None:
            for column in self.columns:
                if column != "step" and isinstance(row.get(column), (int, float)):
                    self._board.add_scalar(_tag(column), row[column], global_step=int(row["step"]))
            self._board.flush()

    def close(self) -> None:
        self._file.close()
        if self._board is not None:
            self._board.close()


def _tag(column: str) -> str:
    """metrics.csv's column as a TensorBoard tag, grouped: loss/forces, val/emt/forces_mev_per_a, lr."""
    if column.startswith("loss_"):
        return f"loss/{column[5:]}"
    if column.startswith("val_"):
        for quantity in ("energy_mev_per_atom", "forces_mev_per_a"):
            if column.endswith(f"_{quantity}"):
                return f"val/{column[4:-len(quantity) - 1]}/{quantity}"
    return {"loss": "loss/total"}.get(column, column)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.8g}" if isinstance(value, float) else str(value)


@dataclass
class StepClock:
    """Steps/s and atoms/s since this segment's first step, and the time left: the log line's tail."""

    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    atoms: int = 0

    def tick(self, atoms: int) -> None:
        self.steps += 1
        self.atoms += atoms

    def atoms_per_s(self) -> float:
        return self.atoms / max(time.perf_counter() - self.start, 1e-9)

    def summary(self, steps_left: int, budget_left_s: float | None) -> str:
        """'1.9 steps/s  1,234 atoms/s  ETA 0:01:02' (the budget's end when that comes first)."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        eta = steps_left * elapsed / max(self.steps, 1)
        if budget_left_s is not None:
            eta = min(eta, max(budget_left_s, 0.0))
        return f"{self.steps / elapsed:.3g} steps/s  {self.atoms / elapsed:,.0f} atoms/s  ETA {_clock(eta)}"


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
