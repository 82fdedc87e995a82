"""Graph parallelism: a float64 training step with every structure's atoms split over a GP group
(× dp replicas × ep expert shards) equals the single-process step on the same global batch."""

import pytest

from conftest import run_mpi_script

pytestmark = [pytest.mark.mpi, pytest.mark.equivalence]


@pytest.mark.parametrize("gp, dp, ep, min_atoms, block, path, backend, halo", [
    (2, 1, 1, 0, "light", "plain", "mpi", "ghost"),
    (4, 1, 1, 0, "light", "fused", "mpi", "ghost"),
    # no structure split: ranks that own no atom of a micro-batch ... while their EP peers own atoms
    pytest.param(4, 1, 1, 1000, "light", "plain", "mpi", "ghost", marks=pytest.mark.slow),
    pytest.param(2, 1, 2, 1000, "moe", "fused", "mpi", "ghost", marks=pytest.mark.slow),
    (2, 2, 1, 0, "light", "fused", "mpi", "ghost"),
    (2, 1, 2, 0, "moe", "fused", "mpi", "ghost"),
    (2, 1, 1, 0, "matris", "plain", "mpi", "ghost"),
    pytest.param(2, 2, 1, 0, "light", "plain", "torch", "ghost", marks=[pytest.mark.backends, pytest.mark.slow]),
    # the per-block halo exchange: all-to-alls inside the forward and both backwards
    (2, 1, 1, 0, "light", "plain", "mpi", "exchange"),
    pytest.param(4, 1, 1, 0, "light", "fused", "mpi", "exchange", marks=pytest.mark.slow),
    # a rank with no atom still meets every exchange
    pytest.param(4, 1, 1, 1000, "light", "plain", "mpi", "exchange", marks=pytest.mark.slow),
    (2, 1, 2, 0, "moe", "fused", "mpi", "exchange"),
    (2, 2, 1, 0, "light", "fused", "mpi", "exchange"),
])
def test_graph_parallel_step_equals_serial(tmp_path, gp, dp, ep, min_atoms, block, path, backend, halo):
    result = run_mpi_script(gp * dp * ep, "gp_equivalence_ranks.py", tmp_path,
                            args=(gp, dp, ep, min_atoms, block, path, backend, halo))
    assert (result["gp"], result["dp"], result["ep"]) == (gp, dp, ep)
    assert result["params_compared"] == result["params_serial"]
    keys = ["energy_G", "forces_N3", "stress_G6", "loss", "grad_norm", "grad_max_rel_diff"] + \
        (["moe_aux"] if block == "moe" else [])
    for key in keys:
        assert result[key] < 1e-10, (key, result)
    owned = [n for per_rank in result["owned"] for n in per_rank]  # every rank, every micro-batch
    if min_atoms:
        assert 0 in owned, result["owned"]  # some rank owned nothing of some micro-batch
    else:
        assert all(owned), result["owned"]  # every structure split: every rank owns atoms
