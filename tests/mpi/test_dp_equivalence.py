import json
from pathlib import Path

import pytest

from conftest import REPO, run_mpi

pytestmark = [pytest.mark.mpi, pytest.mark.equivalence]


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_data_parallel_gradient_equals_serial(tmp_path, ranks):
    out = tmp_path / "result.json"
    proc = run_mpi(ranks, [str(REPO / "tests/mpi/dp_gradient_ranks.py"), str(out)], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == ranks
    assert result["grad_norm"] > 0
    # float64, same global batch: only summation order differs between the runs.
    assert result["max_rel_grad_diff"] < 1e-12, result
    assert result["loss_distributed"] == pytest.approx(result["loss_serial"], rel=1e-13)
