"""Read a run's per-rank perf logs (perf/SCHEMA.md) back into one Run, tolerant of a crash's leftovers.

    load_run(run_dir) -> Run            every rank file; missing ranks and cut-short files are warnings

Its own module because everything downstream (aggregation, the campaign points, the benchmarks)
starts from a Run, and none of it needs the file format's rules.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .formatting import ranges
from .log import SCHEMA_VERSION

RANK_FILE_RE = re.compile(r"^rank-(\d+)\.jsonl$")


@dataclass
class Run:
    """The records of every readable rank file of one run, by rank."""

    run_dir: Path
    world_size: int
    headers: dict[int, dict[str, Any]]
    steps: dict[int, list[dict[str, Any]]]
    ends: dict[int, dict[str, Any]]
    warnings: list[str] = field(default_factory=list)

    @property
    def ranks(self) -> list[int]:
        return sorted(self.headers)

    @property
    def missing_ranks(self) -> list[int]:
        return sorted(set(range(self.world_size)) - set(self.headers))


def _read_records(path: Path, warnings: list[str]) -> list[dict[str, Any]]:
    """Complete JSON lines of one file. A bad last line (a crash mid-write, NUL padding left by
    the file system) is skipped with a warning; a bad line before it is corruption and raises."""
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    # The writer ends every record with "\n"; a final segment without one was cut mid-write.
    last = max((i for i, line in enumerate(lines) if line.strip("\x00 \t\r")), default=-1)
    records = []
    for i, line in enumerate(lines[:last + 1]):
        if not line.strip("\x00 \t\r"):
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if i == last:
                cut = "truncated" if i == len(lines) - 1 else "corrupt"
                warnings.append(f"{path.name}: skipped a {cut} last line (line {i + 1}, "
                                f"{len(line)} characters): the rank was probably killed mid-write")
                continue
            raise ValueError(f"{path}:{i + 1}: corrupt perf record before the last line ({err}); "
                             f"the file is damaged, not merely cut short") from err
        records.append(record)
    return records


def _segments(path: Path, rank: int, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Split one rank file at its headers: [{"header", "steps": {step: record}, "end"}] (perf/SCHEMA.md,
    'Resumed runs: segments')."""
    segments: list[dict[str, Any]] = []
    for lineno, record in enumerate(records, start=1):
        kind = record.get("kind")
        if kind == "header":
            if record.get("schema") != SCHEMA_VERSION:
                raise ValueError(f"{path}:{lineno}: perf schema {record.get('schema')!r}; this reader knows {SCHEMA_VERSION}")
            if record.get("rank") != rank:
                raise ValueError(f"{path}:{lineno}: header says rank {record.get('rank')!r} but the file name says {rank}")
            segments.append({"header": record, "steps": {}, "end": None})
        elif not segments:
            raise ValueError(f"{path}:1: first record has kind {kind!r}, expected 'header'")
        elif kind == "step":
            if record["step"] in segments[-1]["steps"]:
                raise ValueError(f"{path}: step {record['step']} recorded twice in one segment")
            segments[-1]["steps"][record["step"]] = record
        elif kind == "end":
            segments[-1]["end"] = record
        else:
            raise ValueError(f"{path}:{lineno}: unknown record kind {kind!r}")
    return segments


def load_run(run_dir: Path) -> Run:
    """Read every RUN_DIR/perf/rank-RRRRR.jsonl. Missing ranks and cut-short files become warnings;
    a run without any readable rank file, or with contradicting headers, raises.

    A resumed run (several segments per file) reads as one run in its latest layout: a step's
    record is the latest segment's, and steps run on a different world size are left out."""
    run_dir = Path(run_dir)
    perf_dir = run_dir / "perf"
    if not perf_dir.is_dir():
        raise FileNotFoundError(f"no perf logs in run directory {run_dir}: {perf_dir} does not exist")
    warnings: list[str] = []
    segments_of: dict[int, list[dict]] = {}
    for path in sorted(perf_dir.iterdir()):
        match = RANK_FILE_RE.match(path.name)
        if not match:
            continue
        rank = int(match.group(1))
        records = _read_records(path, warnings)
        if not records:
            warnings.append(f"{path.name}: no complete record (the rank died before writing its header)")
            continue
        segments_of[rank] = _segments(path, rank, records)
    if not segments_of:
        raise FileNotFoundError(f"no readable perf log (rank-RRRRR.jsonl with a header) in {perf_dir}"
                                + (f"; {'; '.join(warnings)}" if warnings else ""))

    # The run's current layout is that of its latest segment (the highest resumed_from_step).
    def started(segment: dict) -> int:
        return segment["header"].get("resumed_from_step") or 0

    latest = max((segs[-1] for segs in segments_of.values()), key=started)
    world_size, resumed_at = latest["header"]["world_size"], started(latest)
    headers: dict[int, dict] = {}
    steps: dict[int, list[dict]] = {}
    ends: dict[int, dict] = {}
    other_layout: set[int] = set()
    for rank, segments in segments_of.items():
        if rank >= world_size:
            if started(segments[-1]) == resumed_at and segments[-1]["header"]["world_size"] == world_size:
                raise ValueError(f"perf logs in {perf_dir} for rank {rank} exceed world_size {world_size}")
            warnings.append(f"rank {rank}: its log holds only segments before the resume at step {resumed_at} "
                            f"(world size then {segments[-1]['header']['world_size']}, now {world_size}); not read")
            continue
        if started(segments[-1]) != resumed_at:
            warnings.append(f"rank {rank}: no segment for the resume at step {resumed_at} (the rank died first?)")
            continue
        by_step: dict[int, dict] = {}
        for segment in segments:  # later segments replace the steps they ran again
            for step, record in segment["steps"].items():
                if segment["header"]["world_size"] == world_size:
                    by_step[step] = record
                else:
                    by_step.pop(step, None)
                    other_layout.add(step)
        headers[rank], steps[rank] = segments[-1]["header"], [by_step[k] for k in sorted(by_step)]
        if segments[-1]["end"] is not None:
            ends[rank] = segments[-1]["end"]
    if len({h["world_size"] for h in headers.values()}) > 1:
        raise ValueError(f"perf logs in {perf_dir} disagree on world_size: files of different runs are mixed")
    resumes = sorted({started(s) for segs in segments_of.values() for s in segs if started(s)})
    if resumes:
        warnings.append(f"resumed from checkpoints at step(s) {', '.join(map(str, resumes))}: steps run again "
                        f"after a resume count once (the latest record)")
    if other_layout:
        warnings.append(f"steps {ranges(sorted(other_layout))} ran on a different world size before a resume "
                        f"and are left out")
    if not headers:
        raise FileNotFoundError(f"no rank of the latest segment (world size {world_size}) has a readable log in {perf_dir}")
    run = Run(run_dir, world_size, headers, steps, ends, warnings)
    if run.missing_ranks:
        warnings.append(f"ranks {ranges(run.missing_ranks)} of world_size {world_size} have no readable "
                        f"perf log: sums and % of peak cover the {len(headers)} ranks read")
    no_end = [r for r in run.ranks if r not in ends]
    if no_end:
        warnings.append(f"ranks {ranges(no_end)} have no end record: the run did not finish (or was killed)")
    return run
