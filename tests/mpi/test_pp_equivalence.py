"""Pipeline parallelism: a float64 training step through pp stages (× dp pipelines × ep expert
shards) equals the single-process step on the same global batch, for both schedules."""

import pytest

from conftest import run_mpi_script

pytestmark = [pytest.mark.mpi, pytest.mark.equivalence]


@pytest.mark.parametrize("pp, dp, ep, schedule, block, path, backend", [
    (2, 1, 1, "gpipe", "light", "plain", "mpi"),
    # interleaved stages (parallel.pp_chunks): 2 ranks × 2 stages, 4 ranks × 2 stages, MoE with EP inside
    pytest.param(2, 1, 1, "folded:2", "light", "fused", "mpi", marks=pytest.mark.slow),
    pytest.param(4, 1, 1, "folded:2", "light", "plain", "mpi", marks=pytest.mark.slow),
    pytest.param(2, 1, 2, "folded:2", "moe", "plain", "mpi", marks=pytest.mark.slow),
    # at most 2 of 4 micro-batches alive on 2 × 2 stages: an order in waves, graphs taken stage by stage
    (2, 1, 1, "folded:2:2:4", "light", "plain", "mpi"),
    (2, 1, 1, "folded", "light", "fused", "mpi"),
    (4, 1, 1, "gpipe", "light", "fused", "mpi"),
    (4, 1, 1, "folded", "light", "plain", "mpi"),
    (2, 2, 1, "gpipe", "light", "plain", "mpi"),
    (2, 2, 1, "folded", "light", "fused", "mpi"),
    (2, 1, 2, "gpipe", "moe", "plain", "mpi"),
    (2, 1, 2, "folded", "moe", "fused", "mpi"),
    (2, 1, 1, "folded", "matris", "plain", "mpi"),
    # the stage replicas' gradient reduction through the other backends (transfers stay on MPI)
    pytest.param(2, 2, 1, "folded", "light", "plain", "torch", marks=[pytest.mark.backends, pytest.mark.slow]),
    pytest.param(2, 2, 1, "folded", "light", "plain", "horovod", marks=[pytest.mark.backends, pytest.mark.slow]),
    # expert all-to-alls through gloo while the stages' transfers go over MPI
    pytest.param(2, 1, 2, "folded", "moe", "fused", "torch", marks=[pytest.mark.backends, pytest.mark.slow]),
])
def test_pipeline_step_equals_serial(tmp_path, pp, dp, ep, schedule, block, path, backend):
    # folded:2 — two stages per pipeline rank; folded:2:2:4 — and at most 2 of 4 micro-batches alive
    schedule, *options = schedule.split(":")
    chunks, alive, micro_batches = options + ["1", "0", "3"][len(options):]
    result = run_mpi_script(pp * dp * ep, "pp_equivalence_ranks.py", tmp_path,
                            args=(pp, dp, ep, schedule, block, path, backend, chunks, alive, micro_batches))
    assert (result["pp"], result["dp"], result["ep"]) == (pp, dp, ep)
    assert result["stages"] == list(range(pp))
    assert result["params_compared"] == result["params_serial"]  # the stages together hold every parameter
    keys = ["energy", "forces", "stress", "loss", "grad_norm", "grad_max_rel_diff"] + (["moe_aux"] if block == "moe" else [])
    for key in keys:
        assert result[key] < 1e-10, (key, result)
    # Every stage ran all four phases (the last stage's phase 3 only receives).
    assert all(set(times) >= {"pp_phase1", "pp_phase2", "pp_phase3", "pp_phase4"} for times in result["phase_seconds"])
