"""The figures of the perf reports: a run's loss, time breakdown and throughput, a campaign's scaling.

    run_plots(summary, out_dir) -> [PNG name]              from perf.summary.summarize
    scaling_plots(summary, rows, out_dir) -> [PNG name]    from perf.campaign.summarize_campaign

Every figure is written as PNG and SVG. Its own module because only it needs matplotlib, which is
imported inside the functions: reading and aggregating logs work where matplotlib is missing.
matplotlib's object API with the Agg canvas: no pyplot, no global backend switch.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .formatting import pct, rate, si
from .summary import BREAKDOWN_KEYS, OTHER

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.ticker import Formatter

COLORS = {"data": "#8c564b", "forward": "#1f77b4", "force_backward": "#ff7f0e", "param_backward": "#2ca02c",
          "comm": "#d62728", "optimizer": "#9467bd", OTHER: "#bbbbbb"}


def figure() -> tuple[Figure, Axes]:
    """One report-sized figure on the Agg canvas, with integer ticks on its x axis of optimizer steps."""
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


def save_plot(fig: Figure, out_dir: Path, stem: str) -> str:
    """STEM.png and STEM.svg in out_dir; returns the PNG's name, as the Markdown links it."""
    fig.savefig(out_dir / f"{stem}.png", dpi=120)
    fig.savefig(out_dir / f"{stem}.svg")
    return f"{stem}.png"


def _stacked_breakdown(ax: Axes, x: list[float], heights: Callable[[str], list[float]], tops: list[float],
                       bar_width: float, cap_half_width: float) -> None:
    """The time categories as stacked bars, the step time as a cap over each bar, the legend beside."""
    bottom = [0.0] * len(x)
    for key in BREAKDOWN_KEYS:
        h = heights(key)
        ax.bar(x, h, width=bar_width, bottom=bottom, color=COLORS[key],
               label="other (untimed)" if key == OTHER else key, zorder=2)
        bottom = [b + v for b, v in zip(bottom, h)]
    # A black cap over each bar: the slowest rank's step time; the gap below it is imbalance.
    ax.hlines(tops, [v - cap_half_width for v in x], [v + cap_half_width for v in x], color="black",
              linewidth=1.8, zorder=3, label="step time (max over ranks)")
    ax.set_ylabel("time per step (s)")
    ax.set_ylim(bottom=0)
    handles, labels = ax.get_legend_handles_labels()  # legend top-down in stacking order
    order = [0] + list(range(len(handles) - 1, 0, -1))
    ax.legend([handles[i] for i in order], [labels[i] for i in order],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")


# --------------------------------------------------------------------------------------------
# One run


def _shade_warmup(ax: Axes, steps: list[dict[str, Any]], n_warm: int) -> None:
    if n_warm:
        ax.axvspan(steps[0]["step"] - 0.5, steps[n_warm - 1]["step"] + 0.5, color="0.9", zorder=0,
                   label=f"warm-up (excluded, {n_warm} step{'s' if n_warm > 1 else ''})")


def smoothed(values: list[float], window: int) -> list[float]:
    """Exponential moving average over about `window` steps, bias-corrected (the first points are not
    pulled towards 0); NaN points are skipped."""
    alpha, mean, weight, out = 2.0 / (window + 1), 0.0, 0.0, []
    for v in values:
        if not math.isnan(v):
            mean, weight = (1 - alpha) * mean + alpha * v, (1 - alpha) * weight + alpha
        out.append(mean / weight if weight else float("nan"))
    return out


def _plot_loss(summary: dict[str, Any], out_dir: Path) -> str | None:
    steps = summary["steps"]
    terms = list(summary["final_loss"])
    if not terms:
        return None
    fig, ax = figure()
    x = [s["step"] for s in steps]
    window = max(5, len(x) // 25)
    smooth = len(x) > 30  # a raw curve of a few points is readable as it is
    for i, term in enumerate(terms):
        y = [s["loss"].get(term) for s in steps]
        y = [v if v is not None and v > 0 else float("nan") for v in y]  # log axis: drop ≤ 0
        total = term == "total"
        color = "black" if total else f"C{i}"
        ax.plot(x, y, label=None if smooth else term, color=color, linewidth=0.8 if smooth else (2.2 if total else 1.3),
                alpha=0.3 if smooth else 1.0, marker="o" if len(x) <= 30 else None, markersize=3,
                zorder=3 if total else 2)
        if smooth:  # averaged in log space, as the axis shows it: a spike does not lift the curve for a window
            trend = [math.exp(v) for v in smoothed([math.log(v) if v > 0 else float("nan") for v in y], window)]
            ax.plot(x, trend, label=term, color=color, linewidth=2.2 if total else 1.5, zorder=4 if total else 3)
    ax.set_yscale("log")
    values = [v for s in steps for v in s["loss"].values() if v is not None and v > 0]
    if values and max(values) / min(values) < 100:  # under two decades: label 1-2-5 ticks, not only 10^k
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("loss per structure (global mean, log scale)")
    ax.set_title(f"Training loss by term (lines: geometric mean over ~{window} steps)" if smooth
                 else "Training loss by term")
    ax.legend(loc="best")
    return save_plot(fig, out_dir, "loss_curve")


def _bins(steps: list[dict[str, Any]], max_bars: int = 120) -> tuple[list[list[dict[str, Any]]], int]:
    width = max(1, math.ceil(len(steps) / max_bars))
    return [steps[i:i + width] for i in range(0, len(steps), width)], width


def _plot_breakdown(summary: dict[str, Any], out_dir: Path) -> str:
    groups, width = _bins(summary["steps"])
    fig, ax = figure()
    x = [statistics.fmean(s["step"] for s in g) for g in groups]
    _stacked_breakdown(ax, x, lambda key: [statistics.fmean(s["times_mean_s"][key] for s in g) for g in groups],
                       [statistics.fmean(s["step_time_s"] for s in g) for g in groups],
                       bar_width=0.85 * width, cap_half_width=0.45 * width)
    binned = f", mean over {width}-step bins" if width > 1 else ""
    ax.set_title(f"Step time by category (bars: mean over ranks{binned})")
    return save_plot(fig, out_dir, "step_time_breakdown")


def _plot_throughput(summary: dict[str, Any], out_dir: Path) -> str:
    from matplotlib.ticker import EngFormatter

    steps = summary["steps"]
    fig, ax = figure()
    _shade_warmup(ax, steps, summary["warmup_steps"])
    x = [s["step"] for s in steps]
    y = [s["atoms"] / s["step_time_s"] if s["step_time_s"] > 0 else float("nan") for s in steps]
    ax.plot(x, y, color="#1f77b4", marker="o" if len(x) <= 60 else None, markersize=3, label="per step", zorder=3)
    if summary["atoms_per_s"] is not None:
        ax.axhline(summary["atoms_per_s"], color="#d62728", linestyle="--", zorder=2,
                   label=f"steady state: {rate(summary['atoms_per_s'])} atoms/s")
    ax.yaxis.set_major_formatter(EngFormatter())
    ax.set_ylim(bottom=0)
    ax.set_ylabel("throughput (atoms/s, all ranks)")
    ax.set_title("Training throughput (Σ atoms over ranks / step time)")
    ax.legend(loc="lower right")
    return save_plot(fig, out_dir, "throughput")


def _plot_validation(summary: dict[str, Any], out_dir: Path) -> str | None:
    """Validation MAE per head over the steps that validated: energy (meV/atom) and forces (meV/Å)."""
    points = [(s["step"], s["val"]) for s in summary["steps"] if s.get("val")]
    if not points:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    heads = sorted({h for _, val in points for h in val})
    for ax, key, label in ((axes[0], "energy_mev_per_atom", "energy MAE (meV/atom)"),
                           (axes[1], "forces_mev_per_a", "force MAE (meV/Å)")):
        for i, head in enumerate(heads):
            xy = [(step, val[head][key]) for step, val in points if head in val]
            ax.plot([p[0] for p in xy], [p[1] for p in xy], marker="o", markersize=4, color=f"C{i}", label=head)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(title="head", loc="best")
    fig.suptitle("Validation MAE per head (held-out structures; the weight average where optim.ema_decay > 0)")
    return save_plot(fig, out_dir, "validation")


def _plot_parity(parity: list[dict[str, Any]], out_dir: Path) -> str | None:
    """Predicted against reference energy per atom and force components, one row per dataset."""
    if not parity:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2 * len(parity)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(parity), 2, squeeze=False)
    for row, p in zip(axes, parity):
        for ax, (ref, pred, what, unit, mae) in zip(row, (
                (p["ref_energy"], p["pred_energy"], "energy per atom", "eV/atom", p["energy_mae_mev_per_atom"]),
                (p["ref_forces"], p["pred_forces"], "force components", "eV/Å", p["forces_mae_mev_per_a"]))):
            lo, hi = min(min(ref), min(pred)), max(max(ref), max(pred))
            ax.plot([lo, hi], [lo, hi], color="0.6", linewidth=1, zorder=1)
            ax.scatter(ref, pred, s=4 if len(ref) > 2000 else 9, alpha=0.5, color="#1f77b4", zorder=2)
            ax.set_xlabel(f"reference {what} ({unit})")
            ax.set_ylabel(f"predicted ({unit})")
            ax.set_title(f"{p['name']} (head {p['head']}): MAE {mae:.1f} m{unit}")
            ax.set_aspect("equal", adjustable="datalim")
    return save_plot(fig, out_dir, "parity")


def run_plots(summary: dict[str, Any], out_dir: Path, parity: list[dict[str, Any]] | None = None) -> list[str]:
    """The run's plots in out_dir (none without steps; no loss curve without loss terms, no
    validation plot without validation, no parity plot without predictions)."""
    if not summary["steps"]:
        return []
    return [p for p in (_plot_loss(summary, out_dir), _plot_validation(summary, out_dir),
                        _plot_parity(parity or [], out_dir), _plot_breakdown(summary, out_dir),
                        _plot_throughput(summary, out_dir), _plot_expert_load(summary, out_dir)) if p]


def _plot_expert_load(summary: dict[str, Any], out_dir: Path) -> str | None:
    """MoE runs: the rows each rank's experts ran, per step (the load the placement balances)."""
    steps = [s for s in summary["steps"] if s.get("expert")]
    if not steps:
        return None
    fig, ax = figure()
    _shade_warmup(ax, summary["steps"], summary["warmup_steps"])
    x = [s["step"] for s in steps]
    for i, rank in enumerate(summary["ranks_read"]):
        ax.plot(x, [s["expert"]["rank_rows"][i] for s in steps], marker="o" if len(x) <= 60 else None, markersize=3,
                label=f"rank {rank}", zorder=3)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("expert rows per step")
    ax.set_title("Expert load per rank ((token, slot) rows its experts ran, all MoE layers)")
    if len(summary["ranks_read"]) <= 16:
        ax.legend(loc="lower right", ncol=2)
    return save_plot(fig, out_dir, "expert_load")


# --------------------------------------------------------------------------------------------
# A scaling campaign (rows: the readable points of summarize_campaign, smallest scale first)


def _scale_axis(ax: Axes, rows: list[dict[str, Any]], unit: str) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator

    scales = sorted({r["scale"] for r in rows})
    if len(scales) > 1:
        ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(scales))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{n:,}" for n in scales])
    ax.set_xlabel(unit)


def _y_axis(ax: Axes, values: list[float], formatter: Formatter) -> None:
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


def _measured_and_ideal(ax: Axes, rows: list[dict[str, Any]], key: str, color: str, ideal: list[float],
                        ideal_label: str, unit: str, formatter: Formatter) -> None:
    """rows[key] against the scale, its ideal dashed, on axes that fit both."""
    x = [r["scale"] for r in rows]
    measured = [r[key] for r in rows]
    ax.plot(x, measured, marker="o", color=color, label="measured", zorder=3)
    ax.plot(x, ideal, linestyle="--", color="0.4", label=ideal_label)
    _scale_axis(ax, rows, unit)
    _y_axis(ax, measured + ideal, formatter)


def _plot_scaling_step_time(summary: dict[str, Any], rows: list[dict[str, Any]], out_dir: Path) -> str:
    from matplotlib.ticker import FuncFormatter

    fig, ax = figure()
    unit, mode = summary["scale_unit"], summary["mode"]
    t0, n0 = rows[0]["step_time_s"], rows[0]["scale"]
    ideal = [t0 * n0 / r["scale"] for r in rows] if mode == "strong" else [t0] * len(rows)
    _measured_and_ideal(ax, rows, "step_time_s", "#1f77b4", ideal,
                        "ideal (" + ("T_base·N_base/N" if mode == "strong" else "constant") + ")",
                        unit, FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_ylabel("step time (s, max over ranks)")
    ax.set_title(f"Time per step, {mode} scaling")
    ax.legend(loc="best")
    return save_plot(fig, out_dir, "scaling_step_time")


def _plot_scaling_efficiency(summary: dict[str, Any], rows: list[dict[str, Any]], out_dir: Path) -> str:
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


def _plot_scaling_flops(summary: dict[str, Any], rows: list[dict[str, Any]], out_dir: Path) -> str:
    from matplotlib.ticker import EngFormatter

    fig, ax = figure()
    unit, mode = summary["scale_unit"], summary["mode"]
    f0, n0 = rows[0]["flops_per_s"], rows[0]["scale"]
    ideal = [f0 * r["scale"] / n0 for r in rows]
    _measured_and_ideal(ax, rows, "flops_per_s", "#d62728", ideal, "ideal (linear in " + unit + ")",
                        unit, EngFormatter(unit="FLOP/s"))
    ax.set_ylabel("sustained rate, all ranks")
    title = f"Sustained FLOP/s, {mode} scaling"
    proj = summary["projection"]
    if proj["available"]:
        title += f"\nfull {proj['machine']} projected: {si(proj['flops_per_s'], 'FLOP/s')} at {pct(proj['efficiency'])} % efficiency"
    ax.set_title(title)
    ax.legend(loc="upper left")
    return save_plot(fig, out_dir, "scaling_flops")


def _plot_scaling_breakdown(summary: dict[str, Any], rows: list[dict[str, Any]], out_dir: Path) -> str:
    fig, ax = figure()
    unit = summary["scale_unit"]

    def plural(n: int, word: str) -> str:
        return f"{n:,} {word if n == 1 else word + 's'}"

    labels = [plural(r["ranks"], "rank") if unit == "ranks" else f"{plural(r['nodes'], 'node')}\n{plural(r['ranks'], 'rank')}"
              for r in rows]
    x = list(range(len(rows)))
    _stacked_breakdown(ax, x, lambda key: [r["time_breakdown_mean_s"][key] for r in rows],
                       [r["step_time_s"] for r in rows], bar_width=0.6, cap_half_width=0.32)
    ax.set_xticks(x, labels)
    ax.set_xlabel("")
    ax.set_title("Where the time goes (bars: mean over ranks, steady state)")
    return save_plot(fig, out_dir, "scaling_breakdown")


def scaling_plots(summary: dict[str, Any], rows: list[dict[str, Any]], out_dir: Path) -> list[str]:
    """The campaign's plots in out_dir, from its readable points (none without one)."""
    if not rows:
        return []
    return [_plot_scaling_step_time(summary, rows, out_dir), _plot_scaling_efficiency(summary, rows, out_dir),
            _plot_scaling_flops(summary, rows, out_dir), _plot_scaling_breakdown(summary, rows, out_dir)]
