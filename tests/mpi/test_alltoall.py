import json

import pytest

from conftest import REPO, run_mpi

pytestmark = [pytest.mark.mpi, pytest.mark.alltoall]


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_alltoall_first_and_second_derivatives_equal_serial(tmp_path, ranks):
    out = tmp_path / "result.json"
    proc = run_mpi(ranks, [str(REPO / "tests/mpi/alltoall_ranks.py"), str(out)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["world"] == ranks
    assert r["first_scale"] > 0.1 and r["second_scale"] > 0.1  # derivatives are not trivially zero
    # float64; the exchange only moves numbers, so any difference is summation order (≈1e-16 relative).
    assert r["first_max_abs_diff"] <= 1e-12 * r["first_scale"], r
    assert r["second_max_abs_diff"] <= 1e-12 * r["second_scale"], r
