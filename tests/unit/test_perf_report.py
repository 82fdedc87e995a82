"""exaforce.perf.runlog, .summary, .render: reading per-rank logs, per-step aggregation, the written report."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from exaforce.perf.log import PerfLogWriter, rank_log_path
from exaforce.perf.machines import MACHINES, local_machine, machine_record
from exaforce.perf.render import format_summary, write_report
from exaforce.perf.runlog import load_run
from exaforce.perf.summary import summarize

pytestmark = pytest.mark.perf

PEAK = 1000.0  # FLOP/s per rank
COEFFS = {"const": 10.0, "atoms": 2.0, "edges": 3.0, "angles": 0.5}
# Per rank: counts and the steady-state step time (step 1 is a slow warm-up step on both ranks).
COUNTS = {0: dict(structures=2, atoms=100, edges=1000, angles=5000),
          1: dict(structures=6, atoms=300, edges=3000, angles=7000)}
TOTAL = {0: 2.0, 1: 4.0}
TIMES = {0: dict(data=0.25, forward=0.5, force_backward=0.5, param_backward=0.25, comm=0.25, optimizer=0.125),
         1: dict(data=0.5, forward=1.0, force_backward=1.0, param_backward=0.5, comm=0.5, optimizer=0.25)}
WARMUP_TOTAL = 10.0


def _flops(c: dict) -> float:
    return COEFFS["const"] + COEFFS["atoms"] * c["atoms"] + COEFFS["edges"] * c["edges"] + COEFFS["angles"] * c["angles"]


def _write_run(run_dir: Path, ranks=(0, 1), world_size=2, steps=4, steps_of=None, end=True) -> Path:
    machine = {"name": "test", "device": "test device", "peak_flops_per_s": PEAK, "peak_source": "test"}
    for rank in ranks:
        log = PerfLogWriter(run_dir, rank)
        log.header(rank=rank, world_size=world_size, config={"model": {"cutoff": 5.0}},
                   topology={"dp": world_size, "ep": 1, "ranks_per_node": world_size, "nodes": 1},
                   machine=machine, flop_coefficients=COEFFS)
        n = (steps_of or {}).get(rank, steps)
        for step in range(1, n + 1):
            c = COUNTS[rank % 2]  # ranks 2, 3 of larger worlds repeat ranks 0, 1
            total = WARMUP_TOTAL if step == 1 else TOTAL[rank % 2]
            log.step(step=step, epoch=0, times={**TIMES[rank % 2], "total": total},
                     loss_sum={"total": (1 + 2 * rank) * step, "energy": (1 + 2 * rank) * step / 4},
                     flops=_flops(c), peak_mem_bytes=1000 * (rank + 1) + step, lr=1e-3, **c)
        if end:
            log.end(steps=n, wall_s=123.0)
        log.close()
    return run_dir


def test_aggregation_arithmetic(tmp_path):
    s = summarize(load_run(_write_run(tmp_path)))
    assert s["warnings"] == []
    assert (s["world_size"], s["ranks_read"], s["missing_ranks"]) == (2, [0, 1], [])
    assert (s["n_steps"], s["warmup_steps"], s["steady_first_step"], s["steady_last_step"]) == (4, 1, 2, 4)

    step = s["steps"][1]  # step 2, steady
    assert step["step"] == 2
    assert step["step_time_s"] == 4.0                         # max over ranks
    assert step["rank_time_mean_s"] == 3.0
    assert step["imbalance"] == pytest.approx(4.0 / 3.0, rel=1e-12)
    assert (step["structures"], step["atoms"], step["edges"], step["angles"]) == (8, 400, 4000, 12000)
    assert step["flops"] == _flops(COUNTS[0]) + _flops(COUNTS[1])
    # loss_sum total: rank 0 = step, rank 1 = 3·step; 8 structures -> step/2
    assert step["loss"] == {"total": pytest.approx(2 * 4 / 8), "energy": pytest.approx(2 * 1 / 8)}
    assert step["times_mean_s"]["forward"] == 0.75
    assert step["times_max_s"]["forward"] == 1.0
    # untimed: rank 0 = 2 - 1.875 = 0.125, rank 1 = 4 - 3.75 = 0.25
    assert step["times_mean_s"]["other"] == pytest.approx(0.1875)
    assert s["steps"][0]["step_time_s"] == WARMUP_TOTAL

    # steady state: steps 2-4, each 4 s, 400 atoms, 8 structures
    flops_per_step = _flops(COUNTS[0]) + _flops(COUNTS[1])
    assert s["step_time_s"] == 4.0
    assert s["atoms_per_s"] == pytest.approx(100.0, rel=1e-12)
    assert s["structures_per_s"] == pytest.approx(2.0, rel=1e-12)
    assert s["flops_per_s"] == pytest.approx(flops_per_step / 4.0, rel=1e-12)
    assert s["peak_flops_per_s"] == 2 * PEAK
    assert s["percent_of_peak"] == pytest.approx(100.0 * flops_per_step / 4.0 / (2 * PEAK), rel=1e-12)
    assert s["imbalance_mean"] == pytest.approx(4.0 / 3.0) and s["imbalance_max"] == pytest.approx(4.0 / 3.0)
    assert s["time_breakdown_mean_s"]["comm"] == 0.375 and s["time_breakdown_max_s"]["comm"] == 0.5
    assert s["peak_mem_bytes"] == 2004                       # max over ranks and steps
    assert s["final_loss"]["total"] == pytest.approx(2.0)    # step 4: (4 + 12) / 8
    assert s["wall_s"] == 123.0
    text = format_summary(s)
    assert 2 <= len(text.splitlines()) <= 6 and "100 atoms/s" in text


def test_pipeline_stages_count_structures_once_and_flops_on_every_stage(tmp_path):
    """pp = 2: both stages of one pipeline take the same structures; only the first has loss sums."""
    machine = {"name": "test", "device": "test device", "peak_flops_per_s": PEAK, "peak_source": "test"}
    for rank in (0, 1):
        log = PerfLogWriter(tmp_path, rank)
        log.header(rank=rank, world_size=2, config={}, topology={"dp": 1, "pp": 2, "ep": 1}, machine=machine,
                   flop_coefficients=COEFFS)
        log.step(step=1, epoch=0, times={**TIMES[0], "total": 2.0}, loss_sum={"total": 4.0} if rank == 0 else {},
                 flops=_flops(COUNTS[0]), peak_mem_bytes=1000, lr=1e-3, extra={"pp_stage": rank}, **COUNTS[0])
        log.close()
    step = summarize(load_run(tmp_path))["steps"][0]
    assert (step["structures"], step["atoms"], step["edges"], step["angles"]) == (2, 100, 1000, 5000)
    assert step["flops"] == 2 * _flops(COUNTS[0]) and step["loss"] == {"total": 2.0}


def test_truncated_last_line_is_skipped_and_reported(tmp_path):
    _write_run(tmp_path, end=False)
    with open(rank_log_path(tmp_path, 1), "a", encoding="utf-8") as f:
        f.write('{"kind":"step","step":5,"epoch":0,"times":{"data":0.')  # killed mid-write
    run = load_run(tmp_path)
    assert len(run.steps[1]) == 4
    assert any("rank-00001.jsonl" in w and "truncated last line" in w for w in run.warnings)
    assert any("no end record" in w for w in run.warnings)
    assert summarize(run)["n_steps"] == 4


def test_nul_padded_tail_is_skipped(tmp_path):
    _write_run(tmp_path)
    with open(rank_log_path(tmp_path, 0), "ab") as f:
        f.write(b'{"kind":"st' + b"\x00" * 64 + b"\n")
    run = load_run(tmp_path)
    assert any("rank-00000.jsonl" in w and "corrupt last line" in w for w in run.warnings)


def test_corrupt_line_before_the_last_raises(tmp_path):
    _write_run(tmp_path)
    path = rank_log_path(tmp_path, 0)
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = "{not json\n"
    path.write_text("".join(lines))
    with pytest.raises(ValueError, match=r"rank-00000\.jsonl:3: corrupt"):
        load_run(tmp_path)


def test_missing_rank_is_a_warning_not_a_failure(tmp_path):
    _write_run(tmp_path, ranks=(0, 2), world_size=4)
    run = load_run(tmp_path)
    assert run.missing_ranks == [1, 3]
    s = summarize(run)
    assert any("ranks 1, 3 of world_size 4" in w for w in s["warnings"])
    assert s["steps"][1]["atoms"] == 100 + 100          # ranks 0 and 2, same counts
    assert s["peak_flops_per_s"] == 2 * PEAK               # peak of the ranks read


def test_ranks_with_fewer_steps_limit_the_aggregation(tmp_path):
    _write_run(tmp_path, steps=6, steps_of={1: 4})
    s = summarize(load_run(tmp_path))
    assert [st["step"] for st in s["steps"]] == [1, 2, 3, 4]
    assert any("steps 5-6 were recorded by only some ranks" in w for w in s["warnings"])


def test_no_readable_rank_file_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_run(tmp_path)
    (tmp_path / "perf").mkdir()
    rank_log_path(tmp_path, 0).write_text('{"kind":"hea')
    with pytest.raises(FileNotFoundError, match=r"no readable perf log .*perf"):
        load_run(tmp_path)


def test_mixed_world_sizes_raise(tmp_path):
    _write_run(tmp_path, ranks=(0,), world_size=2)
    _write_run(tmp_path, ranks=(1,), world_size=3)
    with pytest.raises(ValueError, match="disagree on world_size"):
        load_run(tmp_path)


def test_write_report_creates_markdown_and_plots(tmp_path):
    run_dir = _write_run(tmp_path / "run", ranks=(0,), world_size=2, steps=12)
    path = write_report(run_dir)
    assert path == run_dir / "report" / "report.md"
    text = path.read_text()
    for needle in ("| throughput | 50 | atoms/s |", "## Warnings", "ranks 1 of world_size 2",
                   "warm-up", "![loss_curve.png](loss_curve.png)"):
        assert needle in text
    for stem in ("loss_curve", "step_time_breakdown", "throughput"):
        png = path.parent / f"{stem}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert (path.parent / f"{stem}.svg").stat().st_size > 1000
    assert json.loads((path.parent / "summary.json").read_text())["n_steps"] == 12

    other = write_report(run_dir, tmp_path / "elsewhere")
    assert other == tmp_path / "elsewhere" / "report.md" and other.exists()


def test_a_gpu_run_reports_its_device_and_device_memory(tmp_path):
    """Records as a GPU rank writes them (torch_device, device_peak_mem_bytes: no GPU here, the
    fields are written by hand): % of peak uses the device's peak, the report shows device memory."""
    run_dir = tmp_path / "run"
    h100 = {**machine_record("h100", "fp64_matrix"), "torch_device": "cuda:0"}
    log = PerfLogWriter(run_dir, 0)
    log.header(rank=0, world_size=1, config={}, topology={"dp": 1, "ep": 1}, machine=h100, flop_coefficients=COEFFS)
    for step in range(1, 6):
        log.step(step=step, epoch=0, times={**TIMES[0], "total": 2.0}, loss_sum={"total": 1.0}, flops=67e12,
                 peak_mem_bytes=2**30, lr=1e-3, extra={"device_peak_mem_bytes": step * 2**31}, **COUNTS[0])
    log.close()
    s = summarize(load_run(run_dir))
    assert s["percent_of_peak"] == pytest.approx(100 * (67e12 / 2.0) / 67e12)  # the device's FP64 matrix peak
    assert s["device_peak_mem_bytes"] == 5 * 2**31 and s["peak_mem_bytes"] == 2**30
    assert "1 GiB host, 10 GiB device" in format_summary(s).replace(".00", "").replace(".0", "")
    text = write_report(run_dir).read_text()
    assert "| peak device memory, max over ranks | 10 | GiB |" in text and "(`cuda:0`)" in text


def test_machine_table_and_local_peak():
    for peak in MACHINES.values():
        assert peak.source and all(v > 1e12 for v in peak.peak_flops_per_s.values())
        assert peak.peak("fp32") == peak.peak_flops_per_s["fp32"]
    assert MACHINES["perlmutter"].peak("tf32_matrix") == 156e12
    assert machine_record("frontier", "fp64")["peak_flops_per_s"] == 23.95e12
    with pytest.raises(KeyError, match="known"):
        MACHINES["aurora"].peak("fp64_matrix")
    local = local_machine(torch.float32, size=128, repeats=3)
    assert local["name"] == "local-cpu" and local["device"]
    assert local["peak_flops_per_s"] > 1e6
    assert local["peak_source"].startswith("measured: torch.matmul n=128, best of 3")


def test_perf_imports_no_model_trainer_or_cli():
    code = ("import sys, exaforce.perf.runlog, exaforce.perf.summary, exaforce.perf.plots, exaforce.perf.render, "
            "exaforce.perf.campaign, exaforce.perf.formatting, exaforce.perf.flops, exaforce.perf.machines, "
            "exaforce.perf.log; "
            "bad = [m for m in ('exaforce.model', 'exaforce.train', 'exaforce.training', 'exaforce.cli') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _segment(run_dir: Path, rank: int, world_size: int, steps: range, resumed_from: int | None, end: bool,
             step_time: float) -> None:
    log = PerfLogWriter(run_dir, rank, append=resumed_from is not None)
    log.header(rank=rank, world_size=world_size, config={}, topology={"dp": world_size, "ep": 1},
               machine={"name": "test", "peak_flops_per_s": PEAK}, flop_coefficients=COEFFS,
               resumed_from_step=resumed_from)
    c = COUNTS[0]
    for step in steps:
        log.step(step=step, epoch=0, times={**TIMES[0], "total": step_time}, loss_sum={"total": 1.0},
                 flops=_flops(c), peak_mem_bytes=1, lr=1e-3, **c)
    if end:
        log.end(steps=steps[-1], wall_s=1.0)
    log.close()


def test_resumed_run_reads_as_one_run_with_redone_steps_counted_once(tmp_path):
    for rank in (0, 1):  # steps 1-6, crash; resume from the checkpoint at step 4: steps 5-8 again at 3 s
        _segment(tmp_path, rank, 2, range(1, 7), None, end=False, step_time=2.0)
        _segment(tmp_path, rank, 2, range(5, 9), 4, end=True, step_time=3.0)
    s = summarize(load_run(tmp_path))
    assert [st["step"] for st in s["steps"]] == list(range(1, 9))
    assert [st["step_time_s"] for st in s["steps"]] == [2.0] * 4 + [3.0] * 4  # steps 5, 6: the resumed records
    assert any("resumed from checkpoints at step(s) 4" in w for w in s["warnings"])
    assert not any("no end record" in w for w in s["warnings"])


def test_resume_on_fewer_ranks_reads_the_latest_layout(tmp_path):
    for rank in (0, 1):
        _segment(tmp_path, rank, 2, range(1, 5), None, end=False, step_time=2.0)
    _segment(tmp_path, 0, 1, range(5, 9), 4, end=True, step_time=3.0)  # resumed on one rank
    run = load_run(tmp_path)
    assert run.world_size == 1 and run.ranks == [0]
    s = summarize(run)
    assert [st["step"] for st in s["steps"]] == [5, 6, 7, 8]
    text = " ".join(s["warnings"])
    assert "rank 1: its log holds only segments before the resume at step 4" in text
    assert "steps 1-4 ran on a different world size" in text


def test_report_shows_validation_smoothed_loss_and_parity_in_one_html_page(tmp_path):
    """Validation MAE per head over steps, the loss with its moving average, parity plots of
    RUN/predictions/*.bp against their references, all embedded in report.html."""
    import numpy as np

    from exaforce.io.bp import write_bp
    from exaforce.io.schema import Frames
    from exaforce.io.synth import synthesize
    from exaforce.perf.plots import smoothed

    run_dir = tmp_path / "run"
    log = PerfLogWriter(run_dir, 0)
    log.header(rank=0, world_size=1, config={}, topology={"dp": 1, "ep": 1}, machine={"name": "t", "peak_flops_per_s": PEAK},
               flop_coefficients=COEFFS)
    for step in range(1, 61):
        val = {h: {"energy_mev_per_atom": 100.0 / step + k, "forces_mev_per_a": 300.0 / step, "structures": 4}
               for k, h in enumerate(("pbe", "r2scan"))} if step % 20 == 0 else None
        log.step(step=step, epoch=0, times={**TIMES[0], "total": 2.0}, loss_sum={"total": 1.0 + (step % 3)},
                 flops=1.0, peak_mem_bytes=1, lr=1e-3, extra={"val": val} if val else None, **COUNTS[0])
    log.close()
    reference = Frames.from_atoms(synthesize(6, seed=3))
    write_bp(reference, tmp_path / "ref.bp", "ref", method="EMT")
    predicted = Frames(**{**{f: getattr(reference, f) for f in ("numbers_N", "positions_N3", "cell_S33", "pbc_S3",
                                                                  "natoms_S", "stress_S6")},
                          "energy_S": reference.energy_S + 0.01 * reference.natoms_S,  # +10 meV/atom
                          "forces_N3": reference.forces_N3 - 0.02})                  # 20 meV/Å per component
    (run_dir / "predictions").mkdir()
    write_bp(predicted, run_dir / "predictions/ref.bp", "ref", attrs={"predicted_from": str(tmp_path / "ref.bp"),
                                                                    "head": "pbe"}, method="exaforce")
    write_bp(predicted, run_dir / "predictions/orphan.bp", "orphan", method="exaforce")  # no predicted_from
    text = write_report(run_dir).read_text()
    assert "predictions/orphan.bp: its reference (not recorded) is not a dataset here: no parity plot" in text
    assert "## Validation at step 60" in text and "| r2scan | 2.67 | 5 | 4 |" in text
    assert "| ref | pbe | 6 | 10 / 10 | 20 / 20 |" in text
    for stem in ("validation", "parity", "loss_curve"):
        assert f"![{stem}.png]({stem}.png)" in text and (run_dir / "report" / f"{stem}.png").stat().st_size > 5000
    page = (run_dir / "report/report.html").read_text()
    assert page.count('src="data:image/png;base64,') == text.count("![") and not re.search(r'src="[^"]+\.png"', page)
    # the smoothing is a bias-corrected moving average: a constant stays itself, a jump is followed
    assert smoothed([2.0] * 5, 3) == pytest.approx([2.0] * 5)
    jump = smoothed([0.0] * 10 + [1.0] * 30, 5)
    assert jump[9] == 0.0 and 0 < jump[10] < 1 and jump[-1] == pytest.approx(1.0, abs=1e-3)
