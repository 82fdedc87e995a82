"""`exaforce bench gp` as a user runs it (tiny sizes; the figures are README's): one-rank runs give a
projection, the split runs (ghost halo, then the per-block exchange) report every rank's owned atoms and
subgraph, the halo work factor, the exchange's rows per block and the communication share."""

import json

import pytest

from conftest import run_cli

pytestmark = [pytest.mark.mpi, pytest.mark.perf]


def test_bench_gp_reports_ranks_halo_and_projection():
    proc = run_cli(["bench", "gp", "--atoms", "128", "--shape", "rod", "--single-atoms", "64,128", "--ranks", "2",
                    "--preset", "small", "--warmup", "0", "--repeats", "1", "--budget-gib", "100", "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["atoms"] for r in result["single"]] == [64, 128] and result["shape"] == "rod"
    assert [s["halo"] for s in result["split"]] == ["ghost", "exchange"]
    ghost, exchange = result["split"]
    assert all("halo_rows_per_exchange" in r and r["halo_bytes_per_exchange"] > 0 for r in exchange["ranks"])
    assert exchange["bond_work_factor"] < ghost["bond_work_factor"]  # one hop of halo instead of the receptive field
    assert "halo exchange" in proc.stdout
    split = ghost
    assert split["gp"] == 2 and len(split["ranks"]) == 2
    assert sum(r["work"]["owned_atoms"] for r in split["ranks"]) == split["atoms"] == 128
    assert all(r["work"]["atoms"] >= r["work"]["owned_atoms"] for r in split["ranks"])
    assert split["bond_work_factor"] >= 1.0 and 0.0 <= split["comm_share"] < 1.0
    assert split["projected_single_rank"]["peak_gib"] > 0
    assert "halo work:" in proc.stdout and "one rank would need about" in proc.stdout and "fits" in proc.stdout
