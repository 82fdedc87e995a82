"""exaforce.perf.campaign: scaling arithmetic on synthetic campaigns with known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from exaforce.perf.campaign import (extrapolate_efficiency, speedup, strong_efficiency, summarize_campaign,
                                    weak_efficiency)
from exaforce.perf.log import PerfLogWriter, rank_log_path
from exaforce.perf.machines import MACHINES
from exaforce.perf.render import write_campaign_report

pytestmark = pytest.mark.perf

PEAK = 1e12
COEFFS = {"const": 0.0, "atoms": 1e6, "edges": 0.0, "angles": 0.0}
TIMES = dict(data=0.0, forward=0.0, force_backward=0.0, param_backward=0.0, comm=0.0, optimizer=0.0)


def _write_point(run_dir: Path, ranks: int, step_time: float, atoms_per_rank: int, steps: int = 5) -> None:
    """Every rank takes `step_time` per steady step (step 1: a 10x slower warm-up step)."""
    machine = {"name": "frontier", "device": "test", "peak_flops_per_s": PEAK, "peak_source": "test"}
    for rank in range(ranks):
        log = PerfLogWriter(run_dir, rank)
        log.header(rank=rank, world_size=ranks, config={}, topology={"dp": ranks, "ep": 1},
                   machine=machine, flop_coefficients=COEFFS)
        for step in range(1, steps + 1):
            t = step_time * (10 if step == 1 else 1)
            log.step(step=step, epoch=0, times={**TIMES, "forward": t / 2, "total": t}, loss_sum={"total": 1.0},
                     structures=1, atoms=atoms_per_rank, edges=0, angles=0, flops=1e6 * atoms_per_rank,
                     peak_mem_bytes=2**30, lr=1e-3)
        log.end(steps=steps, wall_s=10.0)
        log.close()


def _campaign(tmp_path: Path, mode: str, points: dict[int, float], machine: str = "frontier",
              ranks_per_node: int = 2, atoms: int = 96) -> Path:
    """points: nodes -> step time. Strong mode splits a fixed global count of atoms over the ranks."""
    entries = []
    for nodes, step_time in points.items():
        ranks = nodes * ranks_per_node
        per_rank = atoms // ranks if mode == "strong" else atoms
        _write_point(tmp_path / f"n{nodes}" / "run", ranks, step_time, per_rank)
        entries.append({"name": f"n{nodes}", "nodes": nodes, "ranks": ranks,
                        "global_batch": 64 if mode == "strong" else 8 * ranks, "run_dir": f"n{nodes}/run"})
    (tmp_path / "campaign.json").write_text(json.dumps({
        "schema": 1, "machine": machine, "mode": mode, "scale_unit": "nodes", "ranks_per_node": ranks_per_node,
        "config": "test.toml", "points": entries}))
    return tmp_path


def test_efficiency_formulas():
    assert strong_efficiency(8.0, 1, 4.0, 2) == 1.0
    assert strong_efficiency(8.0, 1, 2.5, 4) == 0.8
    assert strong_efficiency(6.0, 2, 2.0, 8) == 0.75  # base need not be one node: T1·N1/(TN·N)
    assert speedup(8.0, 1, 2.5, 4, "strong") == 3.2 and speedup(2.0, 1, 2.5, 4, "weak") == 3.2
    assert weak_efficiency(2.0, 2.5) == 0.8
    assert extrapolate_efficiency([1, 2, 4], [1.0, 0.9, 0.8], 16) == pytest.approx(0.6)
    assert extrapolate_efficiency([1, 2], [1.0, 0.5], 1024) == 0.0  # clamped
    assert extrapolate_efficiency([4], [0.9], 1024) == 0.9


def test_strong_campaign_known_answers(tmp_path):
    s = summarize_campaign(_campaign(tmp_path, "strong", {1: 8.0, 2: 4.4, 4: 2.5}))
    assert s["warnings"] == [] and s["base_point"] == "n1"
    rows = {r["nodes"]: r for r in s["points"]}
    assert rows[1]["efficiency"] == pytest.approx(1.0, abs=1e-15)
    assert rows[2]["efficiency"] == pytest.approx(8.0 / (4.4 * 2), rel=1e-12)
    assert rows[4]["efficiency"] == pytest.approx(0.8, rel=1e-12)
    assert rows[4]["speedup"] == pytest.approx(3.2, rel=1e-12)
    # 96 atoms in total per step at 1e6 FLOP per atom, 2.5 s per step.
    assert rows[4]["flops_per_s"] == pytest.approx(96 * 1e6 / 2.5, rel=1e-12)
    assert rows[4]["eflops"] == pytest.approx(rows[4]["flops_per_s"] / 1e18)
    assert rows[4]["percent_of_peak"] == pytest.approx(100 * 96e6 / 2.5 / (8 * PEAK), rel=1e-12)

    proj = s["projection"]
    frontier = MACHINES["frontier"]
    eff = extrapolate_efficiency([1, 2, 4], [1.0, 8 / 8.8, 0.8], frontier.system_nodes)
    assert proj["available"] and proj["nodes"] == 9408 and proj["efficiency"] == pytest.approx(eff)
    assert proj["flops_per_s"] == pytest.approx(96e6 / 8.0 * 9408 * eff, rel=1e-12)
    assert "caveat" in proj  # a global batch of 64 cannot be split over 75,264 ranks


def test_weak_campaign_known_answers(tmp_path):
    s = summarize_campaign(_campaign(tmp_path, "weak", {1: 2.0, 2: 2.5}))
    rows = {r["nodes"]: r for r in s["points"]}
    assert rows[2]["efficiency"] == pytest.approx(0.8, rel=1e-12)
    assert rows[2]["speedup"] == pytest.approx(1.6, rel=1e-12)  # scaled: twice the work at 80 % efficiency
    proj = s["projection"]
    assert proj["efficiency"] == pytest.approx(extrapolate_efficiency([1, 2], [1.0, 0.8], 9408))
    assert "caveat" not in proj


def test_missing_point_and_crashed_rank_are_reported(tmp_path):
    root = _campaign(tmp_path, "weak", {1: 2.0, 2: 2.5, 4: 3.0})
    (root / "n4" / "run" / "perf").rename(root / "n4" / "run" / "perf-gone")  # never ran
    path = rank_log_path(root / "n2" / "run", 3)
    path.write_text(path.read_text()[:-20])  # rank 3 cut mid-write: a truncated last line
    rank_log_path(root / "n2" / "run", 1).unlink()  # rank 1's log lost
    s = summarize_campaign(root)
    rows = {r["nodes"]: r for r in s["points"]}
    assert rows[4]["problem"] and rows[4]["efficiency"] is None
    assert rows[2]["missing_ranks"] == [1] and rows[2]["efficiency"] is not None
    text = " ".join(s["warnings"])
    assert "point n4" in text and "ranks 1 of world_size 4" in text and "truncated last line" in text
    out = write_campaign_report(root)
    assert "missing" in out.read_text()


def test_report_files_and_local_machine_has_no_projection(tmp_path):
    root = _campaign(tmp_path, "weak", {1: 2.0, 2: 2.2}, machine="local", ranks_per_node=1)
    path = write_campaign_report(root)
    for name in ("report.md", "report.html", "summary.json", "scaling_step_time.png", "scaling_efficiency.svg",
                 "scaling_flops.png", "scaling_breakdown.png", "points/n2/report.html"):
        assert (path.parent / name).is_file(), name
    html = (path.parent / "report.html").read_text()
    assert "<table>" in html and 'href="points/n1/report.html"' in html
    assert "Not available" in path.read_text()
    summary = json.loads((path.parent / "summary.json").read_text())
    assert math.isclose(summary["points"][1]["efficiency"], 2.0 / 2.2)


def test_bad_manifest_names_the_field(tmp_path):
    (tmp_path / "campaign.json").write_text(json.dumps({"schema": 1, "mode": "diagonal", "scale_unit": "nodes",
                                                        "points": []}))
    with pytest.raises(ValueError, match="mode = 'diagonal'"):
        summarize_campaign(tmp_path)
