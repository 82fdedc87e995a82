"""Expert parallelism: a float64 MoE step on a dp × ep topology equals the single-process step."""

import pytest

from conftest import run_mpi_script

pytestmark = [pytest.mark.mpi, pytest.mark.equivalence]


@pytest.mark.parametrize("dp, ep", [(1, 1), (2, 1), (1, 2), (2, 2), (1, 4)])
def test_expert_parallel_step_equals_serial(tmp_path, dp, ep):
    result = run_mpi_script(dp * ep, "ep_equivalence_ranks.py", tmp_path, args=(dp, ep))
    assert (result["dp"], result["ep"], result["world"]) == (dp, ep, dp * ep)
    assert result["params_compared"] == result["params_serial"]  # every parameter, experts included
    assert result["expert_params_serial"] > 0 and result["moe_aux_value"] > 0
    if ep > 1:
        # 2 MoE layers × 2 blocks: forward (2 each), force backward (2 each), double backward (≥ 2 each).
        assert min(result["alltoall_calls"]) >= 2 * 4 * 3, result["alltoall_calls"]
    # The perf log's expert statistics: every rank sees the world's pairs per expert as one process
    # does, the rows the ranks' experts ran add up to them, each rank counts bytes to each EP rank.
    serial, loads = result["serial_load"], result["loads"]
    assert all(load["experts"] == serial["experts"] for load in loads)
    assert sum(load["rank_rows"] for load in loads) == serial["rank_rows"] == sum(map(sum, serial["experts"]))
    assert all(len(load["alltoall_bytes"]) == (ep if ep > 1 else 0) for load in loads)
    for key in ("energy", "forces", "stress", "loss", "moe_aux", "grad_max_rel_diff"):
        assert result[key] < 1e-10, (key, result)
