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



@pytest.mark.parametrize("ranks", [2, 4])
def test_alltoall_directional_derivatives_match_central_differences(tmp_path, ranks):
    """gradcheck/gradgradcheck style on every rank at once; the circulant split matrix is uneven and
    every rank sends zero rows to itself."""
    r = run_mpi_script(ranks, "alltoall_ranks.py", tmp_path, timeout=120)
    assert abs(r["analytic_first"]) > 1e-3 and abs(r["analytic_second"]) > 1e-3
    assert r["fd_first"] == pytest.approx(r["analytic_first"], rel=1e-7)
    assert r["fd_second"] == pytest.approx(r["analytic_second"], rel=1e-6)
