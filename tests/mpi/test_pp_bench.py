"""`exaforce bench pp` as a user runs it (tiny sizes; the figures are README's): pp = 1, then gpipe and
folded on contiguous stages and folded on interleaved stages on 2 ranks, each with its per-phase work,
bubble and memory per rank, and the simulator's rows for contiguous and interleaved stages."""

import json

import pytest

from conftest import run_cli

pytestmark = [pytest.mark.mpi, pytest.mark.perf]


def test_bench_pp_measures_both_schedules_and_interleaved_stages_and_simulates_them():
    proc = run_cli(["bench", "pp", "--preset", "small", "--blocks", "4", "--batch", "4", "--micro-batches", "4",
                    "--stages", "2", "--chunks", "1,2", "--warmup", "0", "--repeats", "1", "--simulate", "8", "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    runs = [(r["pp"], r["schedule"], r["chunks"]) for r in result["runs"]]
    assert runs == [(1, "none", 1), (2, "gpipe", 1), (2, "folded", 1), (2, "folded", 2)]
    for record in result["runs"][1:]:
        assert 0.0 <= record["bubble"] < 1.0 and len(record["step_mem_gib_per_rank"]) == 2
        assert all(set(work) == {"1", "2", "3", "4"} for work in record["phase_work_s"])  # JSON keys: every phase ran
    rows = result["simulated"]
    assert sorted({r["chunks"] for r in rows}) == [1, 2, 3, 4, 8] and {r["pp"] for r in rows} == {8}
    for row in rows:  # no simulated order beats the bound of its stages
        assert 1.0 - 1e-9 <= row["throughput_ratio"] <= row["best_possible_ratio"] + 1e-9
        assert row["folded_peak_alive"] <= row["folded_alive"]
    assert "3 stage(s) per rank" in proc.stdout and "folded, 3 stages per rank" in proc.stdout
