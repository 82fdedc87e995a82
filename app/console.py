"""Progress of long commands, for the person waiting: a tqdm bar on a terminal, plain periodic lines
(with rate and ETA) where the output goes to a job log, which a bar would fill with carriage returns.
One rank reports (the caller passes enabled=False elsewhere)."""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

QUIET_FOR_S = 5.0        # job logs: nothing for work done sooner (its command prints its own summary) …
LINE_EVERY_S = 30.0      # … then a line at least this often …
LINE_EVERY_SHARE = 0.1   # … and at every tenth of the work


class ProgressReport:
    """Call it with (done, total) as work completes; close() when done (or use it as a context)."""

    def __init__(self, label: str, unit: str = "structures", enabled: bool = True, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.perf_counter, scale: float = 1.0):
        """`scale` turns the counts into the unit shown (bytes reported, MB shown: 1e-6)."""
        self.label, self.unit, self.enabled, self.clock, self.scale = label, unit, enabled, clock, scale
        self.stream = stream or sys.stderr
        self.bar = None
        self.start = clock()
        self.last_line, self.last_share = self.start, 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        share = done / max(total, 1)
        if self.scale != 1.0:  # counted in one unit (bytes), shown in another (MB)
            done, total = done * self.scale, total * self.scale
        if self.stream.isatty():
            self._bar(done, total)
            return
        now = self.clock()
        if now - self.start < QUIET_FOR_S:
            return
        if done == total or share - self.last_share >= LINE_EVERY_SHARE or now - self.last_line >= LINE_EVERY_S:
            self.last_line, self.last_share = now, share
            elapsed = now - self.start
            rate = done / elapsed if elapsed > 0 else 0.0
            eta = f"{(total - done) / rate:.0f} s" if rate > 0 else "?"
            print(f"  {self.label}: {done:.0f}/{total:.0f} {self.unit} ({100 * share:.0f} %), {rate:.3g} {self.unit}/s, "
                  f"{elapsed:.0f} s elapsed, ETA {eta}", file=self.stream, flush=True)

    def _bar(self, done: float, total: float) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.label, unit=f" {self.unit}", file=self.stream, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "ProgressReport":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ProgressReports:
    """One ProgressReport per piece of work, by label, each closed when its work is done: for commands
    that work through several files or datasets. Call it with (label, done, total); `options` are
    ProgressReport's."""

    def __init__(self, **options: object):
        self.options = options
        self.reports: dict[str, ProgressReport] = {}

    def __call__(self, label: str, done: int, total: int) -> None:
        report = self.reports.get(label)
        if report is None:
            report = self.reports[label] = ProgressReport(label, **self.options)
        report(done, total)
        if done == total:
            report.close()
