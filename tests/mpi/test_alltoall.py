import pytest

from conftest import run_mpi_script

pytestmark = [pytest.mark.mpi, pytest.mark.alltoall]


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_alltoall_first_and_second_derivatives_equal_serial(tmp_path, ranks):
    r = run_mpi_script(ranks, "alltoall_ranks.py", tmp_path, timeout=120)
    assert r["world"] == ranks
    assert r["first_scale"] > 0.1 and r["second_scale"] > 0.1  # derivatives are not trivially zero
    # float64; the exchange only moves numbers, so any difference is summation order (≈1e-16 relative).
    assert r["first_max_abs_diff"] <= 1e-12 * r["first_scale"], r
    assert r["second_max_abs_diff"] <= 1e-12 * r["second_scale"], r
