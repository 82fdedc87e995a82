"""The perf reports as text: a few terminal lines, Markdown, HTML, and the report folders they fill.

    format_summary(summary) -> str                  a run, for the terminal
    write_report(run_dir) -> Path                   a run's report.md, report.html, summary.json and plots
    format_campaign(summary) -> str                 a scaling campaign, for the terminal
    write_campaign_report(campaign_dir) -> Path     the same for a campaign, plus each point's own report

Its own module because it is the one place that knows the layout of a report; the figures come
from perf.summary and perf.campaign, the plots from perf.plots.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from .campaign import summarize_campaign
from .formatting import fmt, gib, pct, ranges, rate, si, si_parts
from .parity import parity_of
from .plots import run_plots, scaling_plots
from .runlog import load_run
from .search import summarize_search
from .summary import BREAKDOWN_KEYS, WARMUP_FRACTION, summarize


# --------------------------------------------------------------------------------------------
# One run


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    machine = summary["machine"]
    ranks = f"{len(summary['ranks_read'])}/{summary['world_size']} ranks"
    steps = f"{summary['n_steps']} steps ({summary['warmup_steps']} warm-up excluded)"
    loss = summary["final_loss"]
    lines = [
        f"run {summary['run_dir']}: {ranks}, {steps}",
        f"step time {fmt(summary['step_time_s'], '.4g')} s (max over ranks, mean of steady steps), "
        f"imbalance {fmt(summary['imbalance_mean'], '.3f')} (max/mean), peak memory {gib(summary['peak_mem_bytes'])}"
        + (f" host, {gib(summary['device_peak_mem_bytes'])} device" if summary.get("device_peak_mem_bytes") else ""),
        f"throughput {rate(summary['atoms_per_s'])} atoms/s, {rate(summary['structures_per_s'])} structures/s, "
        f"{si(summary['flops_per_s'], 'FLOP/s')} = {fmt(summary['percent_of_peak'], '.3g')} % of peak "
        f"({si(summary['peak_flops_per_s'], 'FLOP/s')}, {machine.get('name', '?')})",
    ]
    if loss:
        lines.append("final loss " + ", ".join(f"{t} {fmt(v, '.4g')}" for t, v in loss.items()))
    if summary["warnings"]:
        lines.append(f"{len(summary['warnings'])} warning(s): " + "; ".join(summary["warnings"]))
    return "\n".join(lines)


def _run_markdown(summary: dict[str, Any], plots: list[str]) -> str:
    s = summary
    machine, topo = s["machine"], s["topology"]
    step_time = s["step_time_s"]
    out = [f"# Performance report: {Path(s['run_dir']).name}", "",
           f"Run directory `{s['run_dir']}`, report written {datetime.datetime.now().isoformat(timespec='seconds')}.", ""]

    out += ["## Run", "", "| | |", "|---|---|",
            f"| ranks | {len(s['ranks_read'])} read of world_size {s['world_size']}"
            + (f" (missing: {ranges(s['missing_ranks'])})" if s["missing_ranks"] else "") + " |",
            "| topology | " + (", ".join(f"{k} = {v}" for k, v in topo.items()) or "n/a") + " |",
            f"| device (per rank) | {machine.get('name', '?')}: {machine.get('device', '?')}"
            + (f" (`{machine['torch_device']}`)" if machine.get("torch_device") else "") + "; "
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
            f"| throughput | {rate(s['atoms_per_s'])} | atoms/s |",
            f"| throughput | {rate(s['structures_per_s'])} | structures/s |",
            "| compute rate | %s | %s |" % si_parts(s["flops_per_s"], "FLOP/s"),
            "| peak of the ranks read (Σ per-rank peaks) | %s | %s |" % si_parts(s["peak_flops_per_s"], "FLOP/s"),
            f"| fraction of peak | {fmt(s['percent_of_peak'], '.3g')} | % |",
            f"| peak memory, max over ranks | {fmt(s['peak_mem_bytes'] / 2**30 if s['peak_mem_bytes'] is not None else None, '.3g')} | GiB |",
            *([f"| peak device memory, max over ranks | {fmt(s['device_peak_mem_bytes'] / 2**30, '.3g')} | GiB |"]
              if s.get("device_peak_mem_bytes") else []),
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

    if s.get("expert"):
        out += _expert_markdown(s["expert"], s["ranks_read"])

    if s["final_loss"]:
        out += [f"## Loss at the last step ({s['steps'][-1]['step']})", "",
                "Global mean per structure: Σ_ranks loss_sum / Σ_ranks structures.", "",
                "| term | value |", "|---|---:|"]
        out += [f"| {t} | {fmt(v, '.6g')} |" for t, v in s["final_loss"].items()] + [""]

    val = [st for st in s["steps"] if st.get("val")]
    if val:
        out += [f"## Validation at step {val[-1]['step']}", "", "| head | energy MAE (meV/atom) | force MAE (meV/Å) | "
                "structures |", "|---|---:|---:|---:|"]
        out += [f"| {h} | {m['energy_mev_per_atom']:.3g} | {m['forces_mev_per_a']:.3g} | {m['structures']} |"
                for h, m in val[-1]["val"].items()] + [""]
    if s.get("parity"):
        out += ["## Predictions against references", "",
                "`exaforce predict --out RUN/predictions/NAME.bp` on a labelled dataset (every structure of it).", "",
                "| prediction | head | structures | energy MAE / RMSE (meV/atom) | force MAE / RMSE (meV/Å) |",
                "|---|---|---:|---:|---:|"]
        out += [f"| {p['name']} | {p['head']} | {p['structures']} | {p['energy_mae_mev_per_atom']:.3g} / "
                f"{p['energy_rmse_mev_per_atom']:.3g} | {p['forces_mae_mev_per_a']:.3g} / {p['forces_rmse_mev_per_a']:.3g} |"
                for p in s["parity"]] + [""]

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


def _expert_markdown(expert: dict[str, Any], ranks: list[int]) -> list[str]:
    """The MoE section: each rank's expert work and traffic, the imbalance over ranks and experts."""
    mib = lambda b: f"{b / 2**20:.3g}" if b is not None else "n/a"  # noqa: E731
    peers = max((len(row) for row in expert["alltoall_bytes_mean"]), default=0)
    out = ["## Expert load (MoE, steady state)", "",
           "Rows each rank's experts ran per step ((token, slot) pairs, every MoE layer), mean over steady steps; "
           "the host seconds of their forward; MiB each rank sent to each rank of its EP group per step "
           "(dispatch and combine, forward and both backwards).", "",
           f"Max / mean over ranks of the rows: {fmt(expert['rank_max_over_mean_mean'], '.3f')} (mean over steps), "
           f"{fmt(expert['rank_max_over_mean_max'], '.3f')} (worst step). Max / mean over experts of the world's pairs, "
           "per MoE layer (median over steps): " + ", ".join(f"{v:.3g}" for v in expert["layer_max_over_mean_median"])
           + ".", "",
           "| rank | expert rows per step | expert forward (s) |"
           + "".join(f" MiB to EP rank {p} |" for p in range(peers)),
           "|---:|---:|---:|" + "---:|" * peers]
    for rank, rows, seconds, sent in zip(ranks, expert["rank_rows_mean"], expert["expert_seconds_mean"],
                                         expert["alltoall_bytes_mean"] or [[]] * len(ranks)):
        out.append(f"| {rank} | {rows:,.0f} | {fmt(seconds, '.3g')} |" + "".join(f" {mib(b)} |" for b in sent)
                   + " n/a |" * (peers - len(sent)))
    return out + [""]


def write_report(run_dir: Path, out_dir: Path | None = None, summary: dict | None = None) -> Path:
    """Write report.md, report.html, summary.json and the plots (PNG and SVG) to out_dir (default
    RUN_DIR/report); return the path of report.md. Pass `summary` when already computed."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report"
    summary = summary if summary is not None else summarize(load_run(run_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    parity, parity_warnings = parity_of(run_dir)
    summary["parity"] = [{k: v for k, v in p.items() if not k.startswith(("ref_", "pred_"))} for p in parity]
    summary["warnings"] = summary["warnings"] + parity_warnings
    plots = run_plots(summary, out_dir, parity)
    return write_documents(out_dir, summary, _run_markdown(summary, plots), f"Performance report: {run_dir.name}")


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
    """The Markdown report as one self-contained HTML page: the PNG plots beside it are embedded
    (data URIs), so the file can be mailed or attached on its own."""
    import base64
    import html
    import re

    import markdown

    def embed(match: re.Match) -> str:
        png = path.parent / match.group(1)
        if "/" in match.group(1) or not png.is_file():
            return match.group(0)
        return f'src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}"'

    body = markdown.markdown(markdown_text.replace("/report.md)", "/report.html)"), extensions=["tables"])
    body = re.sub(r'src="([^"]+\.png)"', embed, body)
    path.write_text(f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                    f"<title>{html.escape(title)}</title><style>{_HTML_STYLE}</style></head>\n"
                    f"<body>\n{body}\n</body></html>\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# A scaling campaign


def format_campaign(summary: dict[str, Any]) -> str:
    """One line per point and the projection, for the terminal."""
    by_nodes = summary["scale_unit"] == "nodes"
    lines = [f"campaign {summary['campaign_dir']}: {summary['mode']} scaling on {summary['machine']}, "
             f"base point {summary['base_point']}",
             ("nodes " if by_nodes else "") + f"{'ranks':>5} {'step s':>9} {'speed-up':>9} {'eff %':>7} {'FLOP/s':>13} {'% peak':>7}"]
    for r in summary["points"]:
        first = (f"{r['nodes']:>5} " if by_nodes else "") + f"{r['ranks']:>5}"
        if r["problem"]:
            lines.append(f"{first}  missing: {r['problem']}")
            continue
        lines.append(f"{first} {fmt(r['step_time_s'], '9.4g')} {fmt(r['speedup'], '9.3f')} {pct(r['efficiency']):>7} "
                     f"{si(r['flops_per_s'], 'FLOP/s'):>13} {fmt(r['percent_of_peak'], '7.3g')}")
    proj = summary["projection"]
    if proj["available"]:
        lines.append(f"full-machine projection ({proj['machine']}, {proj['nodes']:,} nodes): "
                     f"{si(proj['flops_per_s'], 'FLOP/s')} = {proj['eflops']:.4g} EFLOPS at {pct(proj['efficiency'])} % "
                     f"efficiency ({proj['basis']})")
    if summary["warnings"]:
        lines.append(f"{len(summary['warnings'])} warning(s): " + "; ".join(summary["warnings"]))
    return "\n".join(lines)


def _campaign_markdown(summary: dict[str, Any], plots: list[str]) -> str:
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
                   f"{pct(r['efficiency'])} | %s %s | {fmt(r['eflops'], '.3g')} | {fmt(r['percent_of_peak'], '.3g')} | "
                   f"{fmt(r['atoms_per_s'], ',.0f')} | {fmt(r['imbalance_mean'], '.3f')} | {fmt(mem, '.3g')} |"
                   % si_parts(r["flops_per_s"], "FLOP/s"))
    proj = summary["projection"]
    out += ["", "## Full-machine projection", ""]
    if proj["available"]:
        out += ["| quantity | value |", "|---|---:|",
                f"| machine | {proj['machine']}: {proj['nodes']:,} nodes, {proj['ranks']:,} ranks |",
                f"| efficiency at full scale | {pct(proj['efficiency'])} % ({proj['basis']}) |",
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


def write_campaign_report(campaign_dir: Path, out_dir: Path | None = None,
                          summary: dict | None = None) -> Path:
    """report.md, report.html, summary.json and plots (PNG + SVG) in out_dir (default
    CAMPAIGN/report), plus each readable point's own report under points/NAME/."""
    campaign_dir = Path(campaign_dir)
    out_dir = Path(out_dir) if out_dir is not None else campaign_dir / "report"
    summary = summary if summary is not None else summarize_campaign(campaign_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for r in summary["points"] if r["problem"] is None]
    plots = scaling_plots(summary, rows, out_dir)
    for r in rows:
        write_report(Path(r["run_dir"]), out_dir / "points" / r["name"])
    return write_documents(out_dir, summary, _campaign_markdown(summary, plots), f"Scaling report: {campaign_dir.name}")


# --------------------------------------------------------------------------------------------
# A hyperparameter search


def format_search(summary: dict[str, Any]) -> str:
    """The ranking, a line per trial, for the terminal."""
    lines = [f"search {summary['search_dir']}: {len(summary['trials'])} trials, objective: {summary['objective']}"]
    for r in summary["trials"]:
        params = ", ".join(f"{k}={_param(v)}" for k, v in r["params"].items())
        head = f"  #{r['rank']:<3}" if r.get("rank") else "  --  "
        lines.append(f"{head} {r['name']}  {fmt(r['objective'], '.4g') if r['objective'] is not None else 'n/a':>10}  "
                     f"{params}" + (f"  ({r['problem']})" if r["problem"] else ""))
    return "\n".join(lines)


def _param(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_search_report(search_dir: Path, out_dir: Path | None = None, summary: dict | None = None) -> Path:
    """report.md, report.html and summary.json of a search in out_dir (default SEARCH_DIR/report)."""
    search_dir = Path(search_dir)
    out_dir = Path(out_dir) if out_dir is not None else search_dir / "report"
    summary = summary if summary is not None else summarize_search(search_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = [p["key"] for p in summary["space"] or []]
    out = [f"# Hyperparameter search: {search_dir.name}", "",
           f"Search folder `{search_dir}`; config `{summary['config']}`; sampler: {summary['sampler']}.", "",
           f"Objective (lower is better): {summary['objective']}.", "",
           "| rank | trial | objective | " + " | ".join(f"`{k}`" for k in keys) + " | val energy MAE (meV/atom) | "
           "loss (mean of the last tenth of steps) | steps | atoms/s |",
           "|---:|---|---:|" + "---:|" * len(keys) + "---:|---:|---:|---:|"]
    for r in summary["trials"]:
        out.append(f"| {r.get('rank', '–')} | {r['name']} | {fmt(r['objective'], '.4g')} | "
                   + " | ".join(_param(r["params"].get(k)) for k in keys)
                   + f" | {fmt(r['val_energy_mev_per_atom'], '.4g')} | {fmt(r['late_loss'], '.4g')} | {r['steps']} | "
                   f"{rate(r['atoms_per_s'])} |")
    out += ["", "## Warnings", ""] + ([f"- {w}" for w in summary["warnings"]] or ["None."]) + [""]
    return write_documents(out_dir, summary, "\n".join(out), f"Hyperparameter search: {search_dir.name}")
