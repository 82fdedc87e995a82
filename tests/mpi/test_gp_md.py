"""The ASE calculator with graph parallelism under mpiexec: NVE dynamics of a 108-atom cell whose atoms
are split over 2 ranks follows the one-rank trajectory (forces and every step's energies to float64
rounding) and conserves energy as well, on the plain path and on the large-cell inference path."""

import numpy as np
import pytest

from conftest import run_mpi_script

pytestmark = [pytest.mark.mpi, pytest.mark.inference]

STEPS = 30


@pytest.fixture
def trajectories(tmp_path):
    return {(ranks, halo): run_mpi_script(ranks, "md_gp_ranks.py", tmp_path, args=(halo, STEPS))
            for ranks, halo in ((1, "0"), (2, "ghost"), (2, "exchange"), (2, "exchange-lean"))}


def test_md_over_two_ranks_equals_one_rank(trajectories):
    one = trajectories[1, "0"]
    forces = np.array(one["forces"])
    assert np.abs(forces).max() > 0.1  # a real test: forces of a metal's size
    for halo in ("ghost", "exchange", "exchange-lean"):  # lean: the large-cell inference path
        two = trajectories[2, halo]
        assert two["ranks"] == 2 and len(two["total"]) == len(one["total"]) == STEPS + 1
        assert np.abs(np.array(two["forces"]) - forces).max() <= 1e-12 * np.abs(forces).max(), halo
        assert np.abs(np.array(two["total"]) - one["total"]).max() < 1e-8, halo  # eV, every step
    for run in trajectories.values():  # NVE: the total energy moves far less than the potential energy
        assert np.ptp(run["total"]) < 1e-3 * np.ptp(run["potential"])
