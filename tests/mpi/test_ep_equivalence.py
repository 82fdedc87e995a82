"""Expert parallelism: a float64 MoE step on a dp × ep topology equals the single-process step."""

import pytest

from conftest import run_mpi_script

pytestmark = [pytest.mark.mpi, pytest.mark.equivalence]


@pytest.mark.parametrize("dp, ep, placement", [(1, 1, "contiguous"), (2, 1, "contiguous"), (1, 2, "contiguous"),
                                               (2, 2, "contiguous"), (1, 4, "contiguous"), (1, 2, "scattered"),
                                               (2, 2, "scattered"), (1, 4, "scattered")])
def test_expert_parallel_step_equals_serial(tmp_path, dp, ep, placement):
    """`scattered`: an uneven, non-contiguous placement of the experts (ep_equivalence_ranks.SCATTERED)."""
    result = run_mpi_script(dp * ep, "ep_equivalence_ranks.py", tmp_path, args=(dp, ep, "mpi", placement))
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


def test_checkpoints_hold_logical_experts_whatever_their_placement(tmp_path):
    """Saved from an uneven, non-contiguous placement on ep = 2; restored in the default placement
    on ep = 2 and on one rank with every expert: each expert's weights and AdamW state are its own."""
    result = run_mpi_script(2, "placement_checkpoint_ranks.py", tmp_path)
    assert result["expert_files"] == {"experts-ep0.pt": [1, 2, 3, 5, 6], "experts-ep1.pt": [0, 4, 7]}
    assert result["experts_restored"] == 8 * 4  # 2 blocks × 2 MoE MLPs
    assert result["contiguous_wrong"] == [] and result["whole_wrong"] == []
