"""The light block's neighbour-density input (model.density_sum): live, invariant, exact derivatives,
smooth as a bond leaves the cutoff, trained by the force loss (float64, random weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from scipy.spatial.transform import Rotation

from conftest import predict_float64
from exaforce.config import ModelConfig
from exaforce.model.potential import Potential

pytestmark = pytest.mark.physics
predict = predict_float64
CFG = ModelConfig(width=16, blocks=2, elements=("Cu", "Au"), density_sum=True, cutoff=5.0, three_body_cutoff=3.2)


@pytest.fixture(scope="module")
def model() -> Potential:
    torch.manual_seed(1)
    return Potential(CFG).double()


def cell() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True).repeat((2, 1, 1))
    atoms.numbers[[1, 6]] = 79
    atoms.rattle(0.12, seed=3)
    return atoms


def test_the_density_changes_the_energy(model):
    atoms = cell()
    with_density = float(predict(model, atoms).energy_G[0])
    scales = [block.density_scale for block in model.blocks]
    saved = [s.detach().clone() for s in scales]
    try:
        with torch.no_grad():
            for s in scales:
                s.zero_()
        without = float(predict(model, atoms).energy_G[0])
    finally:
        with torch.no_grad():
            for s, v in zip(scales, saved):
                s.copy_(v)
    assert abs(with_density - without) > 1e-4


def test_energy_invariant_forces_equivariant_and_exact(model):
    atoms = cell()
    pred = predict(model, atoms)
    rot = Rotation.from_euler("xyz", [0.4, -1.2, 2.1]).as_matrix()
    turned = atoms.copy()
    turned.positions, turned.cell = atoms.positions @ rot.T, atoms.cell.array @ rot.T
    after = predict(model, turned)
    assert float(after.energy_G[0]) == pytest.approx(float(pred.energy_G[0]), rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(after.forces_N3.detach().numpy(), pred.forces_N3.detach().numpy() @ rot.T, atol=1e-11)
    h = 1e-5
    for i, x in ((0, 0), (1, 2), (6, 1)):
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[i, x] += h
        minus.positions[i, x] -= h
        numeric = -(float(predict(model, plus).energy_G[0]) - float(predict(model, minus).energy_G[0])) / (2 * h)
        assert abs(numeric - float(pred.forces_N3[i, x])) < 1e-7
    eps = np.zeros((3, 3))
    eps[0, 1] = eps[1, 0] = h
    up, down = atoms.copy(), atoms.copy()
    up.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
    down.set_cell(atoms.cell.array @ (np.eye(3) - eps), scale_atoms=True)
    numeric_xy = (float(predict(model, up).energy_G[0]) - float(predict(model, down).energy_G[0])) / (2 * h) \
        / 2 / atoms.get_volume()
    assert abs(numeric_xy - float(pred.stress_G6[0, 5])) < 1e-8


def test_energy_smooth_as_a_bond_leaves_the_cutoff(model):
    def energy(d: float) -> float:
        atoms = Atoms("CuAuCu", positions=[[0, 0, 0], [2.4, 0, 0], [0.3, d, 0.2]])
        return float(predict(model, atoms).energy_G[0])

    rc = CFG.cutoff
    steps = np.abs(np.diff([energy(d) for d in np.linspace(rc - 0.02, rc + 0.02, 41)]))
    assert steps.max() < 1e-6
    assert energy(rc + 0.01) == pytest.approx(energy(rc + 0.3), abs=1e-14)


def test_force_training_reaches_the_density_scales(model):
    pred = predict(model, cell(), training=True)
    model.zero_grad()
    (pred.forces_N3.pow(2).sum() + pred.stress_G6.pow(2).sum()).backward()
    assert all(float(block.density_scale.grad.abs().sum()) > 0 for block in model.blocks)
