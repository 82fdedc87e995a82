import pytest

from conftest import run_mpi_script

pytestmark = [pytest.mark.mpi, pytest.mark.equivalence]


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_data_parallel_gradient_equals_serial(tmp_path, ranks):
    result = run_mpi_script(ranks, "dp_gradient_ranks.py", tmp_path)
    assert result["world_size"] == ranks
    assert result["grad_norm"] > 0
    # float64, same global batch: only summation order differs between the runs.
    assert result["max_rel_grad_diff"] < 1e-12, result
    assert result["loss_distributed"] == pytest.approx(result["loss_serial"], rel=1e-13)
