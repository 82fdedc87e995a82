"""Read a run's per-rank perf logs (perf/SCHEMA.md), aggregate them per step, write a report.

    load_run(run_dir) -> Run            every rank file, tolerant of a crash's leftovers
    summarize(run) -> dict              per-step aggregation and steady-state figures
    write_report(run_dir) -> Path       report.md, report.html, summary.json and plots (PNG + SVG)
    format_summary(summary) -> str      a few lines for the terminal

Aggregation rules (also printed in each report):
  * a step's time is the max over ranks of total_time: the slowest rank sets the pace;
  * structures, atoms, edges, angles and FLOPs are summed over ranks;
  * the global loss of a step is Σ_ranks loss_sum[term] / Σ_ranks structures, per term;
  * load imbalance of a step = max / mean over ranks of total_time;
  * the time breakdown is, per category, the mean over ranks (so the categories stack up to the
    mean rank time); the max over ranks is reported beside it;
  * throughput = Σ counts / Σ step time over the steady-state steps (a ratio of sums, not a mean
    of per-step rates), after dropping max(1, ⌊n/10⌋) warm-up steps;
  * % of peak = FLOP/s / Σ over ranks read of each header's machine.peak_flops_per_s
    (= world_size × per-device peak when every rank is read).
Only steps recorded by every rank read are aggregated; the others are reported as warnings.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .flops import COEFFICIENT_KEYS, predict_flops
from .log import SCHEMA_VERSION, STEP_TIME_KEYS

RANK_FILE_RE = re.compile(r"^rank-(\d+)\.jsonl$")
OTHER = "other"  # step time not covered by the timed categories (mean over ranks, clipped at 0)
BREAKDOWN_KEYS = (*STEP_TIME_KEYS, OTHER)
WARMUP_FRACTION = 0.1


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


# --------------------------------------------------------------------------------------------
# Reading


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
        warnings.append(f"steps {_ranges(sorted(other_layout))} ran on a different world size before a resume "
                        f"and are left out")
    if not headers:
        raise FileNotFoundError(f"no rank of the latest segment (world size {world_size}) has a readable log in {perf_dir}")
    run = Run(run_dir, world_size, headers, steps, ends, warnings)
    if run.missing_ranks:
        warnings.append(f"ranks {_ranges(run.missing_ranks)} of world_size {world_size} have no readable "
                        f"perf log: sums and % of peak cover the {len(headers)} ranks read")
    no_end = [r for r in run.ranks if r not in ends]
    if no_end:
        warnings.append(f"ranks {_ranges(no_end)} have no end record: the run did not finish (or was killed)")
    return run


# --------------------------------------------------------------------------------------------
# Aggregation


def _aggregate_step(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One step over ranks (records in rank order)."""
    totals = [r["total_time"] for r in records]
    mean_time = statistics.fmean(totals)
    structures = sum(r["structures"] for r in records)
    terms = [t for t in records[0]["loss_sum"] if all(t in r["loss_sum"] for r in records)]
    times_mean = {k: statistics.fmean(r["times"][k] for r in records) for k in STEP_TIME_KEYS}
    times_max = {k: max(r["times"][k] for r in records) for k in STEP_TIME_KEYS}
    untimed = [r["total_time"] - sum(r["times"][k] for k in STEP_TIME_KEYS) for r in records]
    times_mean[OTHER] = max(0.0, statistics.fmean(untimed))
    times_max[OTHER] = max(0.0, max(untimed))
    return {
        "step": records[0]["step"], "epoch": records[0]["epoch"], "lr": records[0]["lr"],
        "step_time_s": max(totals),
        "rank_time_mean_s": mean_time,
        "imbalance": max(totals) / mean_time if mean_time > 0 else None,
        "structures": structures,
        "atoms": sum(r["atoms"] for r in records),
        "edges": sum(r["edges"] for r in records),
        "angles": sum(r["angles"] for r in records),
        "flops": sum(r["flops"] for r in records),
        "loss": {t: sum(r["loss_sum"][t] for r in records) / structures if structures else None
                 for t in terms},
        "times_mean_s": times_mean,
        "times_max_s": times_max,
        "peak_mem_bytes": max(r["peak_mem_bytes"] for r in records),
    }


def warmup_steps(n_steps: int) -> int:
    """Steps dropped before steady state: the first step (allocator, thread pools, kernel caches)
    or the first 10 %, whichever is more; none when only one step exists."""
    return 0 if n_steps < 2 else max(1, int(n_steps * WARMUP_FRACTION))


def summarize(run: Run) -> dict[str, Any]:
    """Per-step aggregates (`steps`) and steady-state figures; see the module docstring for rules.

    Units: seconds, FLOP, FLOP/s, atoms/s, structures/s, bytes, percent. Figures that cannot be
    computed (no steady steps, no peak in the header) are None.
    """
    warnings = list(run.warnings)
    ranks = run.ranks
    by_rank = {r: {rec["step"]: rec for rec in run.steps[r]} for r in ranks}
    common = sorted(set.intersection(*(set(s) for s in by_rank.values())))
    partial = sorted(set.union(*(set(s) for s in by_rank.values())) - set(common))
    if partial:
        warnings.append(f"steps {_ranges(partial)} were recorded by only some ranks (a rank stopped "
                        f"early) and are left out of every figure")

    _check_flops(run, warnings)
    steps = [_aggregate_step([by_rank[r][s] for r in ranks]) for s in common]
    n_warm = warmup_steps(len(steps))
    steady = steps[n_warm:]
    if not steps:
        warnings.append("no step record common to all ranks read: nothing to aggregate")
    elif len(steps) == 1:
        warnings.append("only one step: the steady-state figures include warm-up")

    header = run.headers[ranks[0]]
    peaks = [run.headers[r].get("machine", {}).get("peak_flops_per_s") for r in ranks]
    peak_total = sum(peaks) if all(isinstance(p, (int, float)) and p > 0 for p in peaks) else None
    if peak_total is None:
        warnings.append("a header lacks machine.peak_flops_per_s: % of peak not computed")

    seconds = sum(s["step_time_s"] for s in steady)
    rate = (lambda key: sum(s[key] for s in steady) / seconds) if seconds > 0 else (lambda key: None)
    flops_per_s = rate("flops")
    mean_of = (lambda key, cat: statistics.fmean(s[key][cat] for s in steady)) if steady else None
    imbalances = [s["imbalance"] for s in steady if s["imbalance"] is not None]
    wall = [e["wall_s"] for e in run.ends.values()]
    return {
        "run_dir": str(run.run_dir),
        "world_size": run.world_size,
        "ranks_read": ranks,
        "missing_ranks": run.missing_ranks,
        "machine": header.get("machine", {}),
        "topology": header.get("topology", {}),
        "versions": header.get("versions", {}),
        "flop_coefficients": header.get("flop_coefficients", {}),
        "n_steps": len(steps),
        "warmup_steps": n_warm,
        "steady_first_step": steady[0]["step"] if steady else None,
        "steady_last_step": steady[-1]["step"] if steady else None,
        "step_time_s": seconds / len(steady) if steady else None,
        "step_time_median_s": statistics.median(s["step_time_s"] for s in steady) if steady else None,
        "imbalance_mean": statistics.fmean(imbalances) if imbalances else None,
        "imbalance_max": max(imbalances) if imbalances else None,
        "atoms_per_s": rate("atoms"),
        "structures_per_s": rate("structures"),
        "flops_per_s": flops_per_s,
        "peak_flops_per_s": peak_total,
        "percent_of_peak": 100.0 * flops_per_s / peak_total if flops_per_s is not None and peak_total else None,
        "time_breakdown_mean_s": {k: mean_of("times_mean_s", k) for k in BREAKDOWN_KEYS} if steady else {},
        "time_breakdown_max_s": {k: mean_of("times_max_s", k) for k in BREAKDOWN_KEYS} if steady else {},
        "peak_mem_bytes": max((s["peak_mem_bytes"] for s in steps), default=None),
        "final_loss": steps[-1]["loss"] if steps else {},
        "wall_s": max(wall) if wall else None,
        "steps": steps,
        "warnings": warnings,
    }


def _check_flops(run: Run, warnings: list[str]) -> None:
    """Each step's flops should equal the header's coefficients applied to its counts."""
    for rank in run.ranks:
        coeffs = run.headers[rank].get("flop_coefficients") or {}
        if set(COEFFICIENT_KEYS) - set(coeffs):
            warnings.append(f"rank {rank}: header flop_coefficients lack {sorted(set(COEFFICIENT_KEYS) - set(coeffs))}")
            continue
        off = [rec["step"] for rec in run.steps[rank]
               if not math.isclose(rec["flops"], predict_flops(coeffs, rec["atoms"], rec["edges"], rec["angles"]),
                                   rel_tol=1e-6, abs_tol=1.0)]
        if off:
            warnings.append(f"rank {rank}: flops of steps {_ranges(off)} differ from the header's "
                            f"coefficients applied to the step's counts")


# --------------------------------------------------------------------------------------------
# Formatting


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    parts, values = [], sorted(values)
    start = prev = None
    for v in values + [None]:
        if v is not None and prev is not None and v == prev + 1:
            prev = v
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = v
    return ", ".join(parts)


def si_parts(value: float | None, unit: str, digits: int = 3) -> tuple[str, str]:
    """1.234e12, 'FLOP/s' -> ('1.23', 'TFLOP/s')."""
    if value is None:
        return "n/a", unit
    for factor, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.{digits}g}", f"{prefix}{unit}"
    return f"{value:.{digits}g}", unit


def si(value: float | None, unit: str, digits: int = 3) -> str:
    """1.234e12, 'FLOP/s' -> '1.23 TFLOP/s'."""
    return " ".join(si_parts(value, unit, digits))


def _rate(value: float | None) -> str:
    """Counts per second: 13312.4 -> '13,312'; 21.48 -> '21.5'."""
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def fmt(value: float | None, spec: str = ".4g") -> str:
    return "n/a" if value is None else format(value, spec)


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.3g} GiB"


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    machine = summary["machine"]
    ranks = f"{len(summary['ranks_read'])}/{summary['world_size']} ranks"
    steps = f"{summary['n_steps']} steps ({summary['warmup_steps']} warm-up excluded)"
    loss = summary["final_loss"]
    lines = [
        f"run {summary['run_dir']}: {ranks}, {steps}",
        f"step time {fmt(summary['step_time_s'], '.4g')} s (max over ranks, mean of steady steps), "
        f"imbalance {fmt(summary['imbalance_mean'], '.3f')} (max/mean), peak memory {_gib(summary['peak_mem_bytes'])}",
        f"throughput {_rate(summary['atoms_per_s'])} atoms/s, {_rate(summary['structures_per_s'])} structures/s, "
        f"{si(summary['flops_per_s'], 'FLOP/s')} = {fmt(summary['percent_of_peak'], '.3g')} % of peak "
        f"({si(summary['peak_flops_per_s'], 'FLOP/s')}, {machine.get('name', '?')})",
    ]
    if loss:
        lines.append("final loss " + ", ".join(f"{t} {fmt(v, '.4g')}" for t, v in loss.items()))
    if summary["warnings"]:
        lines.append(f"{len(summary['warnings'])} warning(s): " + "; ".join(summary["warnings"]))
    return "\n".join(lines)


def _markdown(summary: dict[str, Any], plots: list[str]) -> str:
    s = summary
    machine, topo = s["machine"], s["topology"]
    step_time = s["step_time_s"]
    out = [f"# Performance report: {Path(s['run_dir']).name}", "",
           f"Run directory `{s['run_dir']}`, report written {datetime.datetime.now().isoformat(timespec='seconds')}.", ""]

    out += ["## Run", "", "| | |", "|---|---|",
            f"| ranks | {len(s['ranks_read'])} read of world_size {s['world_size']}"
            + (f" (missing: {_ranges(s['missing_ranks'])})" if s["missing_ranks"] else "") + " |",
            "| topology | " + (", ".join(f"{k} = {v}" for k, v in topo.items()) or "n/a") + " |",
            f"| device (per rank) | {machine.get('name', '?')}: {machine.get('device', '?')}; "
            f"peak {si(machine.get('peak_flops_per_s'), 'FLOP/s')} ({machine.get('peak_source', 'no source')}) |",
            f"| steps | {s['n_steps']} common to all ranks read; the first {s['warmup_steps']} excluded as warm-up"
            + (f"; steady state = steps {s['steady_first_step']}-{s['steady_last_step']}" if s["steady_first_step"] else "")
            + " |",
            f"| wall time (end record, max over ranks) | {fmt(s['wall_s'], '.4g')} s |",
            "| versions | " + (", ".join(f"{k} {v}" for k, v in s["versions"].items()) or "n/a") + " |",
            "| FLOP coefficients (per step) | " + (", ".join(f"{k} {fmt(v, '.4g')}" for k, v in s["flop_coefficients"].items()) or "n/a") + " |",
            ""]

    out += ["## Summary (steady state)", "", "| quantity | value | unit |", "|---|---:|---|",
            f"| step time, mean (max over ranks per step) | {fmt(step_time)} | s |",
            f"| step time, median | {fmt(s['step_time_median_s'])} | s |",
            f"| load imbalance, mean / worst step (max / mean rank time) | {fmt(s['imbalance_mean'], '.3f')} / "
            f"{fmt(s['imbalance_max'], '.3f')} | 1 |",
            f"| throughput | {_rate(s['atoms_per_s'])} | atoms/s |",
            f"| throughput | {_rate(s['structures_per_s'])} | structures/s |",
            "| compute rate | %s | %s |" % si_parts(s["flops_per_s"], "FLOP/s"),
            "| peak of the ranks read (Σ per-rank peaks) | %s | %s |" % si_parts(s["peak_flops_per_s"], "FLOP/s"),
            f"| fraction of peak | {fmt(s['percent_of_peak'], '.3g')} | % |",
            f"| peak memory, max over ranks | {fmt(s['peak_mem_bytes'] / 2**30 if s['peak_mem_bytes'] is not None else None, '.3g')} | GiB |",
            ""]

    if s["time_breakdown_mean_s"]:
        out += ["## Time per step by category (steady state)", "",
                "Mean over steady steps of the mean over ranks (these stack up to the mean rank time) and of "
                "the max over ranks. `other` = total_time minus the timed categories.", "",
                "| category | mean over ranks (s) | max over ranks (s) | share of step time (%) |",
                "|---|---:|---:|---:|"]
        for k in BREAKDOWN_KEYS:
            mean, worst = s["time_breakdown_mean_s"][k], s["time_breakdown_max_s"][k]
            share = 100.0 * mean / step_time if step_time else None
            out.append(f"| {k} | {mean:.4g} | {worst:.4g} | {fmt(share, '.3g')} |")
        out += [f"| **step (max over ranks)** | | {step_time:.4g} | 100 |", ""]

    if s["final_loss"]:
        out += [f"## Loss at the last step ({s['steps'][-1]['step']})", "",
                "Global mean per structure: Σ_ranks loss_sum / Σ_ranks structures.", "",
                "| term | value |", "|---|---:|"]
        out += [f"| {t} | {fmt(v, '.6g')} |" for t, v in s["final_loss"].items()] + [""]

    if plots:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]

    out += ["## Warnings", ""] + ([f"- {w}" for w in s["warnings"]] or ["None."]) + [""]

    out += ["## Method", "",
            "- Step time = max over ranks of `total_time` (the slowest rank sets the pace); load imbalance = "
            "max / mean of the per-rank `total_time`.",
            "- Structures, atoms, edges, angles and FLOPs are summed over ranks; the loss of a step is "
            "Σ_ranks loss_sum / Σ_ranks structures.",
            f"- Warm-up: the first max(1, ⌊{WARMUP_FRACTION:g}·n⌋) steps are excluded from every steady-state "
            "figure; throughput = Σ counts / Σ step time over the steady steps.",
            "- FLOPs per step come from coefficients fitted once with `torch.utils.flop_counter` "
            "(matmul-like ops, forward and backward); % of peak = FLOP/s / Σ over ranks read of the "
            "per-rank device peak in each header.",
            "- Only steps recorded by every rank read are aggregated.", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: no pyplot, no global backend switch)

COLORS = {"data": "#8c564b", "forward": "#1f77b4", "force_backward": "#ff7f0e", "param_backward": "#2ca02c",
           "comm": "#d62728", "optimizer": "#9467bd", OTHER: "#bbbbbb"}


def figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.set_xlabel("optimizer step")
    return fig, ax


def _shade_warmup(ax, steps: list[dict], n_warm: int) -> None:
    if n_warm:
        ax.axvspan(steps[0]["step"] - 0.5, steps[n_warm - 1]["step"] + 0.5, color="0.9", zorder=0,
                   label=f"warm-up (excluded, {n_warm} step{'s' if n_warm > 1 else ''})")


def save_plot(fig, out_dir: Path, stem: str) -> str:
    fig.savefig(out_dir / f"{stem}.png", dpi=120)
    fig.savefig(out_dir / f"{stem}.svg")
    return f"{stem}.png"


def _plot_loss(summary: dict, out_dir: Path) -> str | None:
    steps = summary["steps"]
    terms = list(summary["final_loss"])
    if not terms:
        return None
    fig, ax = figure()
    x = [s["step"] for s in steps]
    for term in terms:
        y = [s["loss"].get(term) for s in steps]
        y = [v if v is not None and v > 0 else float("nan") for v in y]  # log axis: drop ≤ 0
        total = term == "total"
        ax.plot(x, y, label=term, color="black" if total else None, linewidth=2.2 if total else 1.3,
                marker="o" if len(x) <= 30 else None, markersize=3, zorder=3 if total else 2)
    ax.set_yscale("log")
    values = [v for s in steps for v in s["loss"].values() if v is not None and v > 0]
    if values and max(values) / min(values) < 100:  # under two decades: label 1-2-5 ticks, not only 10^k
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("loss per structure (global mean, log scale)")
    ax.set_title("Training loss by term")
    ax.legend(loc="best")
    return save_plot(fig, out_dir, "loss_curve")


def _bins(steps: list[dict], max_bars: int = 120) -> tuple[list[list[dict]], int]:
    width = max(1, math.ceil(len(steps) / max_bars))
    return [steps[i:i + width] for i in range(0, len(steps), width)], width


def _plot_breakdown(summary: dict, out_dir: Path) -> str:
    steps = summary["steps"]
    groups, width = _bins(steps)
    fig, ax = figure()
    x = [statistics.fmean(s["step"] for s in g) for g in groups]
    bottom = [0.0] * len(groups)
    for key in BREAKDOWN_KEYS:
        h = [statistics.fmean(s["times_mean_s"][key] for s in g) for g in groups]
        label = "other (untimed)" if key == OTHER else key
        ax.bar(x, h, width=0.85 * width, bottom=bottom, color=COLORS[key], label=label, zorder=2)
        bottom = [b + v for b, v in zip(bottom, h)]
    # A black cap over each bar: the slowest rank's step time; the gap below it is imbalance.
    tops = [statistics.fmean(s["step_time_s"] for s in g) for g in groups]
    ax.hlines(tops, [v - 0.45 * width for v in x], [v + 0.45 * width for v in x], color="black",
              linewidth=1.8, zorder=3, label="step time (max over ranks)")
    ax.set_ylabel("time per step (s)")
    ax.set_ylim(bottom=0)
    binned = f", mean over {width}-step bins" if width > 1 else ""
    ax.set_title(f"Step time by category (bars: mean over ranks{binned})")
    handles, labels = ax.get_legend_handles_labels()  # legend top-down in stacking order
    order = [0] + list(range(len(handles) - 1, 0, -1))
    ax.legend([handles[i] for i in order], [labels[i] for i in order],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return save_plot(fig, out_dir, "step_time_breakdown")


def _plot_throughput(summary: dict, out_dir: Path) -> str:
    from matplotlib.ticker import EngFormatter

    steps = summary["steps"]
    fig, ax = figure()
    _shade_warmup(ax, steps, summary["warmup_steps"])
    x = [s["step"] for s in steps]
    y = [s["atoms"] / s["step_time_s"] if s["step_time_s"] > 0 else float("nan") for s in steps]
    ax.plot(x, y, color="#1f77b4", marker="o" if len(x) <= 60 else None, markersize=3, label="per step", zorder=3)
    if summary["atoms_per_s"] is not None:
        ax.axhline(summary["atoms_per_s"], color="#d62728", linestyle="--", zorder=2,
                   label=f"steady state: {_rate(summary['atoms_per_s'])} atoms/s")
    ax.yaxis.set_major_formatter(EngFormatter())
    ax.set_ylim(bottom=0)
    ax.set_ylabel("throughput (atoms/s, all ranks)")
    ax.set_title("Training throughput (Σ atoms over ranks / step time)")
    ax.legend(loc="lower right")
    return save_plot(fig, out_dir, "throughput")


def write_report(run_dir: Path, out_dir: Path | None = None, summary: dict | None = None) -> Path:
    """Write report.md, report.html, summary.json and the plots (PNG and SVG) to out_dir (default
    RUN_DIR/report); return the path of report.md. Pass `summary` when already computed."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report"
    summary = summary if summary is not None else summarize(load_run(run_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = []
    if summary["steps"]:
        plots = [p for p in (_plot_loss(summary, out_dir), _plot_breakdown(summary, out_dir),
                             _plot_throughput(summary, out_dir)) if p]
    return write_documents(out_dir, summary, _markdown(summary, plots), f"Performance report: {run_dir.name}")


def write_documents(out_dir: Path, summary: dict, markdown_text: str, title: str) -> Path:
    """summary.json, report.md and report.html in out_dir; returns the path of report.md."""
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    path = out_dir / "report.md"
    path.write_text(markdown_text, encoding="utf-8")
    write_html(out_dir / "report.html", markdown_text, title)
    return path


_HTML_STYLE = """body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #ccc;padding:.25rem .6rem}
th{background:#f3f3f3}td{text-align:right}td:first-child{text-align:left}img{max-width:100%}
code{background:#f3f3f3;padding:0 .2rem}"""


def write_html(path: Path, markdown_text: str, title: str) -> None:
    """The Markdown report as a standalone HTML page (plots stay beside it as PNG files)."""
    import html

    import markdown

    body = markdown.markdown(markdown_text.replace("/report.md)", "/report.html)"), extensions=["tables"])
    path.write_text(f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                    f"<title>{html.escape(title)}</title><style>{_HTML_STYLE}</style></head>\n"
                    f"<body>\n{body}\n</body></html>\n", encoding="utf-8")
