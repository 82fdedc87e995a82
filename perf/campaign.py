"""Scaling campaigns: one run per point, a manifest, and the scaling figures of the points.

    summarize_campaign(campaign_dir) -> dict    per-point figures, scaling, full-machine projection

The numbers only: the report (text, Markdown, plots) is perf.render's and perf.plots', so that
`exaforce jobs`, which writes the manifests, imports the manifest's constants without matplotlib.

A campaign folder (rendered by `exaforce jobs campaign`) holds `campaign.json` (perf/SCHEMA.md)
and one run folder per point. Each point is read with perf.runlog and perf.summary (a point that
never ran, or whose ranks died, is reported, not fatal), then:

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
from .runlog import load_run
from .summary import summarize

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
