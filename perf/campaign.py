"""Scaling campaigns: one run per point, a manifest, and the scaling figures of the points.

A campaign folder (rendered by `exaforce jobs campaign`) holds `campaign.json` (perf/SCHEMA.md)
and one run folder per point. Each point is read with perf.report (a point that never ran, or
whose ranks died, is reported, not fatal), then:

    speed-up            S_N = T_base / T_N
    strong efficiency   E_N = T_base · N_base / (T_N · N)     (fixed global batch)
    weak efficiency     E_N = T_base / T_N                    (fixed batch per rank)

with T the steady-state step time (max over ranks) and N the scale count — nodes on a cluster,
ranks on one host (`scale_unit`); the base is the smallest readable point. FLOP/s are summed
over ranks; EFLOPS = FLOP/s / 1e18.

Full-machine projection (machines with a system size in perf/machines.py): the base point's
FLOP/s per node × the machine's nodes × the efficiency extrapolated to that many nodes (a
least-squares line in log2 N through the measured efficiencies, clamped to [0, 1]; with one
point, efficiency 1 is assumed and the report says so).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .machines import MACHINES
from .report import (BREAKDOWN_KEYS, COLORS, OTHER, figure, fmt, load_run, save_plot, si, si_parts,
                     summarize, write_documents, write_report)

CAMPAIGN_FILE = "campaign.json"
CAMPAIGN_SCHEMA = 1
MODES = ("strong", "weak")
SCALE_UNITS = ("nodes", "ranks")


# --------------------------------------------------------------------------------------------
# Scaling arithmetic (pure functions; tests check them on known answers)


def speedup(t_base: float, n_base: int, t: float, n: int, mode: str) -> float:
    """Work per second relative to the base point: T_base/T_N, times N/N_base when the work grows with N."""
    return t_base / t * (n / n_base if mode == "weak" else 1.0)


def strong_efficiency(t_base: float, n_base: int, t: float, n: int) -> float:
    """T_base·N_base / (T_N·N): 1 when N times the resources take 1/N of the time per step."""
    return t_base * n_base / (t * n)


def weak_efficiency(t_base: float, t: float) -> float:
    """T_base / T_N: 1 when N times the work on N times the resources takes the same time."""
    return t_base / t


def extrapolate_efficiency(scales: list[int], efficiencies: list[float], target: int) -> float:
    """Efficiency at `target` from a least-squares line in log2(scale), clamped to [0, 1]."""
    if len(scales) != len(efficiencies) or not scales:
        raise ValueError("extrapolate_efficiency needs one efficiency per scale, at least one")
    if len(set(scales)) == 1:
        return min(1.0, max(0.0, statistics.fmean(efficiencies)))
    slope, intercept = statistics.linear_regression([math.log2(n) for n in scales], efficiencies)
    return min(1.0, max(0.0, intercept + slope * math.log2(target)))


# --------------------------------------------------------------------------------------------
# Reading


@dataclass
class Point:
    name: str
    nodes: int
    ranks: int
    global_batch: int | None
    run_dir: Path
    summary: dict[str, Any] | None = None
    problem: str | None = None  # why the point has no figures

    def scale(self, unit: str) -> int:
        return self.nodes if unit == "nodes" else self.ranks


def load_manifest(campaign_dir: Path) -> dict[str, Any]:
    """campaign.json, checked: every error names the file and the field."""
    path = Path(campaign_dir) / CAMPAIGN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{campaign_dir} is not a campaign folder: {path} does not exist "
                                f"(render one with `exaforce jobs campaign`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if manifest.get("schema") != CAMPAIGN_SCHEMA:
        raise ValueError(f"{path}: campaign schema {manifest.get('schema')!r}; this reader knows {CAMPAIGN_SCHEMA}")
    for key, allowed in (("mode", MODES), ("scale_unit", SCALE_UNITS)):
        if manifest.get(key) not in allowed:
            raise ValueError(f"{path}: {key} = {manifest.get(key)!r}, must be one of {allowed}")
    points = manifest.get("points")
    if not isinstance(points, list) or not points:
        raise ValueError(f"{path}: 'points' must be a non-empty list")
    for i, p in enumerate(points):
        for key in ("name", "nodes", "ranks", "run_dir"):
            if key not in p:
                raise ValueError(f"{path}: points[{i}] lacks {key!r}")
        if not (isinstance(p["nodes"], int) and isinstance(p["ranks"], int) and p["nodes"] >= 1 and p["ranks"] >= 1):
            raise ValueError(f"{path}: points[{i}] ({p['name']}): nodes and ranks must be integers >= 1")
    return manifest


def load_points(campaign_dir: Path, manifest: dict[str, Any]) -> list[Point]:
    points = []
    for p in manifest["points"]:
        point = Point(p["name"], p["nodes"], p["ranks"], p.get("global_batch"), Path(campaign_dir) / p["run_dir"])
        try:
            point.summary = summarize(load_run(point.run_dir))
        except (FileNotFoundError, ValueError) as err:
            point.problem = str(err)
        else:
            if point.summary["step_time_s"] is None:
                point.problem = "no steady-state step common to its ranks"
        points.append(point)
    return sorted(points, key=lambda q: (q.scale(manifest["scale_unit"]), q.name))


# --------------------------------------------------------------------------------------------
# Aggregation


def _projection(manifest: dict, base: dict | None, rows: list[dict]) -> dict[str, Any]:
    machine = MACHINES.get(manifest.get("machine", ""))
    if machine is None or machine.system_nodes is None:
        return {"available": False,
                "why": f"machine {manifest.get('machine')!r} has no system size in perf/machines.py"}
    if base is None or manifest["scale_unit"] != "nodes":
        return {"available": False, "why": "no readable point measured in nodes"}
    measured = [r for r in rows if r["efficiency"] is not None]
    nodes = machine.system_nodes
    ranks = nodes * machine.ranks_per_node
    efficiency = extrapolate_efficiency([r["nodes"] for r in measured], [r["efficiency"] for r in measured], nodes)
    flops = base["flops_per_s"] / base["nodes"] * nodes * efficiency
    projection = {
        "available": True, "machine": machine.name, "nodes": nodes, "ranks": ranks,
        "efficiency": efficiency, "flops_per_s": flops, "eflops": flops / 1e18,
        "peak_flops_per_s": ranks * base["peak_flops_per_s"] / base["ranks"] if base["peak_flops_per_s"] else None,
        "source": machine.system_source,
        "basis": ("one measured point: efficiency 1 assumed" if len(measured) < 2 else
                  f"efficiency extrapolated from {len(measured)} points (line in log2 nodes)"),
    }
    if manifest["mode"] == "strong" and base["global_batch"] is not None and base["global_batch"] < ranks:
        projection["caveat"] = (f"strong scaling keeps the global batch ({base['global_batch']}): fewer "
                                f"structures than the full machine's {ranks:,} ranks, so it cannot run as is")
    if projection["peak_flops_per_s"]:
        projection["percent_of_peak"] = 100.0 * flops / projection["peak_flops_per_s"]
    return projection


def summarize_campaign(campaign_dir: Path) -> dict[str, Any]:
    """Per-point figures, scaling against the base point, and the full-machine projection."""
    manifest = load_manifest(campaign_dir)
    unit, mode = manifest["scale_unit"], manifest["mode"]
    points = load_points(campaign_dir, manifest)
    readable = [p for p in points if p.problem is None]
    warnings = [f"point {p.name} ({p.scale(unit)} {unit}): {p.problem}" for p in points if p.problem]
    for p in readable:
        warnings += [f"point {p.name}: {w}" for w in p.summary["warnings"]]
    base = readable[0] if readable else None

    rows = []
    for p in points:
        s = p.summary if p.problem is None else None
        row = {"name": p.name, "nodes": p.nodes, "ranks": p.ranks, "scale": p.scale(unit),
               "global_batch": p.global_batch, "run_dir": str(p.run_dir), "problem": p.problem,
               "missing_ranks": s["missing_ranks"] if s else None}
        for key in ("step_time_s", "step_time_median_s", "flops_per_s", "atoms_per_s", "structures_per_s",
                    "percent_of_peak", "peak_flops_per_s", "imbalance_mean", "peak_mem_bytes",
                    "time_breakdown_mean_s"):
            row[key] = s[key] if s else None
        row["eflops"] = row["flops_per_s"] / 1e18 if row["flops_per_s"] is not None else None
        row["speedup"] = row["efficiency"] = None
        if s and base is not None:
            t_base, n_base, t, n = base.summary["step_time_s"], base.scale(unit), s["step_time_s"], p.scale(unit)
            row["speedup"] = speedup(t_base, n_base, t, n, mode)
            row["efficiency"] = (strong_efficiency(t_base, n_base, t, n) if mode == "strong"
                                 else weak_efficiency(t_base, t))
        rows.append(row)
    if base is None:
        warnings.append("no point has readable perf logs: nothing to compare")
    base_row = next((r for r in rows if base is not None and r["name"] == base.name), None)
    return {
        "campaign_dir": str(campaign_dir), "machine": manifest.get("machine"), "mode": mode,
        "scale_unit": unit, "config": manifest.get("config"), "base_point": base.name if base else None,
        "points": rows, "projection": _projection(manifest, base_row, rows), "warnings": warnings,
    }


# --------------------------------------------------------------------------------------------
# Formatting


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def format_campaign(summary: dict[str, Any]) -> str:
    by_nodes = summary["scale_unit"] == "nodes"
    lines = [f"campaign {summary['campaign_dir']}: {summary['mode']} scaling on {summary['machine']}, "
             f"base point {summary['base_point']}",
             ("nodes " if by_nodes else "") + f"{'ranks':>5} {'step s':>9} {'speed-up':>9} {'eff %':>7} {'FLOP/s':>13} {'% peak':>7}"]
    for r in summary["points"]:
        first = (f"{r['nodes']:>5} " if by_nodes else "") + f"{r['ranks']:>5}"
        if r["problem"]:
            lines.append(f"{first}  missing: {r['problem']}")
            continue
        lines.append(f"{first} {fmt(r['step_time_s'], '9.4g')} {fmt(r['speedup'], '9.3f')} {_pct(r['efficiency']):>7} "
                     f"{si(r['flops_per_s'], 'FLOP/s'):>13} {fmt(r['percent_of_peak'], '7.3g')}")
    proj = summary["projection"]
    if proj["available"]:
        lines.append(f"full-machine projection ({proj['machine']}, {proj['nodes']:,} nodes): "
                     f"{si(proj['flops_per_s'], 'FLOP/s')} = {proj['eflops']:.4g} EFLOPS at {_pct(proj['efficiency'])} % "
                     f"efficiency ({proj['basis']})")
    if summary["warnings"]:
        lines.append(f"{len(summary['warnings'])} warning(s): " + "; ".join(summary["warnings"]))
    return "\n".join(lines)


def _markdown(summary: dict[str, Any], plots: list[str]) -> str:
    unit, mode = summary["scale_unit"], summary["mode"]
    eff = "T_base·N_base / (T_N·N)" if mode == "strong" else "T_base / T_N"
    out = [f"# Scaling report: {Path(summary['campaign_dir']).name}", "",
           f"{mode.capitalize()} scaling on **{summary['machine']}**, scale counted in {unit}; "
           f"base point `{summary['base_point']}`; config `{summary['config']}`.", "",
           "## Points", "",
           f"| point | {'nodes | ' if unit == 'nodes' else ''}ranks | global batch | step time (s) | speed-up | "
           f"{mode} efficiency (%) | FLOP/s | EFLOPS | % of peak | atoms/s | imbalance | peak memory (GiB) |",
           "|---|" + "---:|" * (12 if unit == "nodes" else 11)]
    for r in summary["points"]:
        nodes = f"{r['nodes']} | " if unit == "nodes" else ""
        if r["problem"]:
            out.append(f"| {r['name']} | {nodes}{r['ranks']} | {r['global_batch']} | missing: {r['problem']} "
                       "| | | | | | | | |")
            continue
        mem = r["peak_mem_bytes"] / 2**30 if r["peak_mem_bytes"] is not None else None
        note = f" (ranks {r['missing_ranks']} missing)" if r["missing_ranks"] else ""
        out.append(f"| [{r['name']}](points/{r['name']}/report.md){note} | {nodes}{r['ranks']} | "
                   f"{r['global_batch']} | {fmt(r['step_time_s'])} | {fmt(r['speedup'], '.3f')} | "
                   f"{_pct(r['efficiency'])} | %s %s | {fmt(r['eflops'], '.3g')} | {fmt(r['percent_of_peak'], '.3g')} | "
                   f"{fmt(r['atoms_per_s'], ',.0f')} | {fmt(r['imbalance_mean'], '.3f')} | {fmt(mem, '.3g')} |"
                   % si_parts(r["flops_per_s"], "FLOP/s"))
    proj = summary["projection"]
    out += ["", "## Full-machine projection", ""]
    if proj["available"]:
        out += ["| quantity | value |", "|---|---:|",
                f"| machine | {proj['machine']}: {proj['nodes']:,} nodes, {proj['ranks']:,} ranks |",
                f"| efficiency at full scale | {_pct(proj['efficiency'])} % ({proj['basis']}) |",
                "| sustained rate | %s %s |" % si_parts(proj["flops_per_s"], "FLOP/s"),
                f"| EFLOPS | {proj['eflops']:.4g} |",
                f"| % of the machine's peak | {fmt(proj.get('percent_of_peak'), '.3g')} |",
                f"| system size source | {proj['source']} |", ""]
        if "caveat" in proj:
            out += [f"Caveat: {proj['caveat']}.", ""]
    else:
        out += [f"Not available: {proj['why']}.", ""]
    if plots:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    out += ["## Warnings", ""] + ([f"- {w}" for w in summary["warnings"]] or ["None."]) + [""]
    out += ["## Method", "",
            f"- T = steady-state step time of a point (max over ranks per step, mean over steps after warm-up); "
            f"N = {unit}; base = the smallest readable point.",
            "- Speed-up = " + ("T_base / T_N" if mode == "strong" else "(N / N_base) · T_base / T_N (scaled speed-up: "
                                "work per second relative to the base)") + f"; {mode} efficiency = {eff}.",
            "- FLOP/s = Σ FLOPs over ranks / Σ step time (FLOPs from coefficients calibrated with "
            "torch.utils.flop_counter); EFLOPS = FLOP/s / 1e18; % of peak against Σ per-rank device peaks.",
            "- Projection: the base point's FLOP/s per node × the machine's nodes × the efficiency extrapolated "
            "to that node count (least-squares line in log2 N, clamped to [0, 1]).",
            "- Each point's own report (time breakdown, loss, throughput) is under `points/NAME/`.", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Plots


def _scale_axis(ax, rows: list[dict], unit: str) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator

    scales = sorted({r["scale"] for r in rows})
    if len(scales) > 1:
        ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(scales))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{n:,}" for n in scales])
    ax.set_xlabel(unit)


def _y_axis(ax, values: list[float], formatter) -> None:
    """Log y axis over more than a decade (ticks as plain numbers, no 6×10^0), else linear from 0."""
    from matplotlib.ticker import LogLocator, NullFormatter

    ax.yaxis.set_major_formatter(formatter)
    if max(values) < 10 * min(values):
        ax.set_ylim(bottom=0, top=1.1 * max(values))
        return
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(4.0, 6.0, 8.0, 9.0)))
    ax.yaxis.set_major_formatter(formatter)
    ax.yaxis.set_minor_formatter(NullFormatter())


def _plot_step_time(summary: dict, rows: list[dict], out_dir: Path) -> str:
    fig, ax = figure()
    unit, mode = summary["scale_unit"], summary["mode"]
    x = [r["scale"] for r in rows]
    ax.plot(x, [r["step_time_s"] for r in rows], marker="o", color="#1f77b4", label="measured", zorder=3)
    t0, n0 = rows[0]["step_time_s"], rows[0]["scale"]
    ideal = [t0 * n0 / n for n in x] if mode == "strong" else [t0] * len(x)
    ax.plot(x, ideal, linestyle="--", color="0.4", label="ideal (" + ("T_base·N_base/N" if mode == "strong" else "constant") + ")")
    _scale_axis(ax, rows, unit)
    from matplotlib.ticker import FuncFormatter

    _y_axis(ax, [r["step_time_s"] for r in rows] + ideal, FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_ylabel("step time (s, max over ranks)")
    ax.set_title(f"Time per step, {mode} scaling")
    ax.legend(loc="best")
    return save_plot(fig, out_dir, "scaling_step_time")


def _plot_efficiency(summary: dict, rows: list[dict], out_dir: Path) -> str:
    fig, ax = figure()
    unit, mode = summary["scale_unit"], summary["mode"]
    x = [r["scale"] for r in rows]
    y = [100 * r["efficiency"] for r in rows]
    ax.plot(x, y, marker="o", color="#2ca02c", label=f"{mode} efficiency", zorder=3)
    for n, e in zip(x, y):
        ax.annotate(f"{e:.0f}%", (n, e), textcoords="offset points", xytext=(0, 7), ha="center", fontsize="small")
    ax.axhline(100, linestyle="--", color="0.4", label="ideal (100 %)")
    _scale_axis(ax, rows, unit)
    ax.set_ylim(0, max(110, max(y) + 10))
    ax.set_ylabel("parallel efficiency (%)")
    ax.set_title(f"{mode.capitalize()}-scaling efficiency: " + ("T_base·N_base/(T_N·N)" if mode == "strong" else "T_base/T_N"))
    ax.legend(loc="lower left")
    return save_plot(fig, out_dir, "scaling_efficiency")


def _plot_flops(summary: dict, rows: list[dict], out_dir: Path) -> str:
    from matplotlib.ticker import EngFormatter

    fig, ax = figure()
    unit, mode = summary["scale_unit"], summary["mode"]
    x = [r["scale"] for r in rows]
    ax.plot(x, [r["flops_per_s"] for r in rows], marker="o", color="#d62728", label="measured", zorder=3)
    f0, n0 = rows[0]["flops_per_s"], rows[0]["scale"]
    ideal = [f0 * n / n0 for n in x]
    ax.plot(x, ideal, linestyle="--", color="0.4", label="ideal (linear in " + unit + ")")
    _scale_axis(ax, rows, unit)
    _y_axis(ax, [r["flops_per_s"] for r in rows] + ideal, EngFormatter(unit="FLOP/s"))
    ax.set_ylabel("sustained rate, all ranks")
    title = f"Sustained FLOP/s, {mode} scaling"
    proj = summary["projection"]
    if proj["available"]:
        title += f"\nfull {proj['machine']} projected: {si(proj['flops_per_s'], 'FLOP/s')} at {_pct(proj['efficiency'])} % efficiency"
    ax.set_title(title)
    ax.legend(loc="upper left")
    return save_plot(fig, out_dir, "scaling_flops")


def _plot_breakdown(summary: dict, rows: list[dict], out_dir: Path) -> str:
    fig, ax = figure()
    unit = summary["scale_unit"]
    def plural(n: int, word: str) -> str:
        return f"{n:,} {word if n == 1 else word + 's'}"

    labels = [plural(r["ranks"], "rank") if unit == "ranks" else f"{plural(r['nodes'], 'node')}\n{plural(r['ranks'], 'rank')}"
              for r in rows]
    x = list(range(len(rows)))
    bottom = [0.0] * len(rows)
    for key in BREAKDOWN_KEYS:
        h = [r["time_breakdown_mean_s"][key] for r in rows]
        ax.bar(x, h, bottom=bottom, width=0.6, color=COLORS[key], label="other (untimed)" if key == OTHER else key, zorder=2)
        bottom = [b + v for b, v in zip(bottom, h)]
    ax.hlines([r["step_time_s"] for r in rows], [v - 0.32 for v in x], [v + 0.32 for v in x], color="black",
              linewidth=1.8, zorder=3, label="step time (max over ranks)")
    ax.set_xticks(x, labels)
    ax.set_xlabel("")
    ax.set_ylabel("time per step (s)")
    ax.set_ylim(bottom=0)
    ax.set_title("Where the time goes (bars: mean over ranks, steady state)")
    handles, names = ax.get_legend_handles_labels()
    order = [0] + list(range(len(handles) - 1, 0, -1))
    ax.legend([handles[i] for i in order], [names[i] for i in order], loc="upper left",
              bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return save_plot(fig, out_dir, "scaling_breakdown")


def write_campaign_report(campaign_dir: Path, out_dir: Path | None = None,
                          summary: dict | None = None) -> Path:
    """report.md, report.html, summary.json and plots (PNG + SVG) in out_dir (default
    CAMPAIGN/report), plus each readable point's own report under points/NAME/."""
    campaign_dir = Path(campaign_dir)
    out_dir = Path(out_dir) if out_dir is not None else campaign_dir / "report"
    summary = summary if summary is not None else summarize_campaign(campaign_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for r in summary["points"] if r["problem"] is None]
    plots = []
    if rows:
        plots = [_plot_step_time(summary, rows, out_dir), _plot_efficiency(summary, rows, out_dir),
                 _plot_flops(summary, rows, out_dir), _plot_breakdown(summary, rows, out_dir)]
    for r in rows:
        write_report(Path(r["run_dir"]), out_dir / "points" / r["name"])
    return write_documents(out_dir, summary, _markdown(summary, plots), f"Scaling report: {campaign_dir.name}")
