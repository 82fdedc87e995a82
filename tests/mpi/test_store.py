"""SampleStore under mpiexec -n 1, 2, 4: any rank fetches any structures, bit-exact, in the asked
order; global shuffling visits every structure exactly once per epoch; empty shards work."""

import pytest

from conftest import run_mpi_script
from exaforce.io.sampler import shard_range

pytestmark = [pytest.mark.mpi, pytest.mark.data]

FETCH_CASES = ("random_repeats", "sweep", "reversed", "empty")


def _check(r: dict, ranks: int, n: int) -> None:
    assert r["world"] == ranks and r["n"] == n
    assert [tuple(x["shard"]) for x in r["ranks"]] == [shard_range(n, p, ranks) for p in range(ranks)]
    for x in r["ranks"]:
        assert x["n_structures"] == n and x["natoms_equal"], x
        # Every field bit-equal to Frames.select of the whole dataset (dtype, shape, NaN rows).
        assert x["mismatches"] == {case: [] for case in FETCH_CASES}, x
        assert x["fetched_ok"] and x["energies_unique"], x
        assert "out of range" in x["out_of_range"] and "after free" in x["after_free"], x
        assert "must be integers" in x["float_indices"], x
    # Not collective: the others fetched rank 0's shard while rank 0 stayed outside MPI.
    assert r["ranks"][0]["owner_outside_mpi_served"], r["ranks"][0]
    assert all(x["owner_outside_mpi_ok"] for x in r["ranks"][1:])
    # Shards that do not fit, or disagree on a dtype (only possible with two non-empty shards):
    # the same error on every rank, raised before any window is allocated.
    assert len({x["bad_shards"] for x in r["ranks"]}) == 1 and "contiguous" in r["ranks"][0]["bad_shards"]
    (bad_dtype,) = {x["bad_dtype"] for x in r["ranks"]}
    if min(n, ranks) >= 2:
        assert "only rank 0 has ['energy_S (float32" in bad_dtype
    else:
        assert bad_dtype is None
    # Every structure exactly once per epoch, fetched through the store and as dealt by the sampler.
    assert r["counts_store"] == [[1] * n] * 2
    assert r["counts_sampler"] == [[1] * n] * 2


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_fetch_equals_select_and_global_epochs_cover_once(tmp_path, ranks):
    r = run_mpi_script(ranks, "store_ranks.py", tmp_path, args=(13,), timeout=180)
    _check(r, ranks, 13)
    assert r["epoch_orders"][0] != r["epoch_orders"][1]  # reshuffled between epochs
    assert len({x["local_nbytes"] for x in r["ranks"]}) == ranks  # uneven shards (13 structures)


@pytest.mark.parametrize("ranks, n", [(4, 3), (2, 1)])
def test_empty_shards_when_world_exceeds_structures(tmp_path, ranks, n):
    r = run_mpi_script(ranks, "store_ranks.py", tmp_path, args=(n,), timeout=180)
    _check(r, ranks, n)
    assert [x["local_nbytes"] == 0 for x in r["ranks"]] == [p >= n for p in range(ranks)]
