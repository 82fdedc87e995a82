"""Aggregate a Run's per-rank step records per step, and the steady-state figures of the run.

    summarize(run) -> dict              per-step aggregation and steady-state figures (JSON-ready)

Its own module because the arithmetic is what a report's numbers mean: the rendering, the plots
and the scaling campaigns only read the dict it returns. Aggregation rules (also printed in each
report):
  * a step's time is the max over ranks of total_time: the slowest rank sets the pace;
  * structures, atoms, edges, angles and FLOPs are summed over ranks; with pipeline stages (records
    with `pp_stage`) every stage of a pipeline takes the same structures, so structures, atoms, edges,
    angles and loss sums count on first stages (pp_stage 0) only, and FLOPs (each stage's own) on all;
    likewise with graph parallelism (records with `gp_index`) on each GP group's first rank only,
    and FLOPs (each rank's subgraph, halo included) on all;
  * the global loss of a step is Σ_ranks loss_sum[term] / Σ_ranks structures, per term;
  * load imbalance of a step = max / mean over ranks of total_time;
  * the time breakdown is, per category, the mean over ranks (so the categories stack up to the
    mean rank time); the max over ranks is reported beside it;
  * throughput = Σ counts / Σ step time over the steady-state steps (a ratio of sums, not a mean
    of per-step rates), after dropping max(1, ⌊n/10⌋) warm-up steps;
  * % of peak = FLOP/s / Σ over ranks read of each header's machine.peak_flops_per_s
    (= world_size × per-device peak when every rank is read);
  * MoE runs: expert load per rank = the rows its experts ran (all MoE layers, all micro-batches),
    its imbalance max / mean over ranks, means over the steady steps.
Only steps recorded by every rank read are aggregated; the others are reported as warnings.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from .flops import COEFFICIENT_KEYS, predict_flops
from .formatting import ranges
from .log import STEP_TIME_KEYS
from .runlog import Run

OTHER = "other"  # step time not covered by the timed categories (mean over ranks, clipped at 0)
BREAKDOWN_KEYS = (*STEP_TIME_KEYS, OTHER)
WARMUP_FRACTION = 0.1


def _aggregate_step(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One step over ranks (records in rank order)."""
    totals = [r["total_time"] for r in records]
    mean_time = statistics.fmean(totals)
    # a pipeline's structures: its first stage's; a GP group's: its first rank's
    first = [r for r in records if r.get("pp_stage", 0) == 0 and r.get("gp_index", 0) == 0]
    structures = sum(r["structures"] for r in first)
    terms = [t for t in first[0]["loss_sum"] if all(t in r["loss_sum"] for r in first)]
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
        "atoms": sum(r["atoms"] for r in first),
        "edges": sum(r["edges"] for r in first),
        "angles": sum(r["angles"] for r in first),
        "flops": sum(r["flops"] for r in records),
        "loss": {t: sum(r["loss_sum"][t] for r in first) / structures if structures else None
                 for t in terms},
        "times_mean_s": times_mean,
        "times_max_s": times_max,
        "peak_mem_bytes": max(r["peak_mem_bytes"] for r in records),
        "device_peak_mem_bytes": max((r["device_peak_mem_bytes"] for r in records if "device_peak_mem_bytes" in r),
                                     default=None),
        "val": records[0].get("val"),  # validation MAE per head (global: the same in every rank's record)
        "expert": _expert_step(records),
    }


def _expert_step(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """MoE runs: rows each rank's experts ran, their max / mean over ranks, the world's max / mean
    over experts per layer, each rank's expert forward seconds and all-to-all bytes to each EP rank."""
    loads = [r.get("expert_load") for r in records]
    if not all(loads):
        return None
    rows = [load["rank_rows"] for load in loads]
    mean = statistics.fmean(rows)
    return {"rank_rows": rows, "rank_max_over_mean": max(rows) / mean if mean > 0 else None,
            "layer_max_over_mean": loads[0]["max_over_mean"],
            "expert_seconds": [load.get("expert_seconds") for load in loads],
            "alltoall_bytes": [load.get("alltoall_bytes", []) for load in loads]}


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
        warnings.append(f"steps {ranges(partial)} were recorded by only some ranks (a rank stopped "
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
        "device_peak_mem_bytes": max((s["device_peak_mem_bytes"] for s in steps
                                      if s["device_peak_mem_bytes"] is not None), default=None),
        "expert": _expert_summary([s["expert"] for s in steady]) if steady and steady[0]["expert"] else None,
        "final_loss": steps[-1]["loss"] if steps else {},
        "wall_s": max(wall) if wall else None,
        "steps": steps,
        "warnings": warnings,
    }


def _expert_summary(per_step: list[dict[str, Any]]) -> dict[str, Any]:
    """Steady-state expert figures: per-rank means over steps, max / mean over ranks (mean and worst
    step), the world's max / mean over experts per layer (median over steps)."""
    ratios = [e["rank_max_over_mean"] for e in per_step if e["rank_max_over_mean"] is not None]
    mean_over_steps = lambda values: [statistics.fmean(v) if None not in v else None  # noqa: E731
                                      for v in zip(*values)]
    return {"rank_rows_mean": mean_over_steps([e["rank_rows"] for e in per_step]),
            "rank_max_over_mean_mean": statistics.fmean(ratios) if ratios else None,
            "rank_max_over_mean_max": max(ratios, default=None),
            "layer_max_over_mean_median": [statistics.median(v) for v in zip(*(e["layer_max_over_mean"] for e in per_step))],
            "expert_seconds_mean": mean_over_steps([e["expert_seconds"] for e in per_step]),
            "alltoall_bytes_mean": [mean_over_steps(rows) if rows and rows[0] else []
                                    for rows in zip(*(e["alltoall_bytes"] for e in per_step))]}


def _check_flops(run: Run, warnings: list[str]) -> None:
    """Each step's flops should equal the header's coefficients applied to its counts."""
    for rank in run.ranks:
        coeffs = run.headers[rank].get("flop_coefficients") or {}
        if set(COEFFICIENT_KEYS) - set(coeffs):
            warnings.append(f"rank {rank}: header flop_coefficients lack {sorted(set(COEFFICIENT_KEYS) - set(coeffs))}")
            continue
        off = [rec["step"] for rec in run.steps[rank]  # graph parallelism: the rank's own subgraphs' counts
               if not math.isclose(rec["flops"], predict_flops(coeffs, *(rec.get("gp_work", rec)[k]
                                                                         for k in ("atoms", "edges", "angles"))),
                                   rel_tol=1e-6, abs_tol=1.0)]
        if off:
            warnings.append(f"rank {rank}: flops of steps {ranges(off)} differ from the header's "
                            f"coefficients applied to the step's counts")
