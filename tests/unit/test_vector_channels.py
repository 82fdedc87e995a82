"""The light block's vector features (model.vector_channels > 0): the energy stays invariant and the
forces equivariant, forces and stress stay exact derivatives, the energy stays smooth at the cutoff,
and force training reaches the vector layers (float64, random weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from scipy.spatial.transform import Rotation

from exaforce.config import Config, ConfigError, DataConfig, ModelConfig, validate
from exaforce.graph import batch_from_atoms
from exaforce.model.potential import Potential, energy_forces_stress

pytestmark = pytest.mark.physics
CFG = ModelConfig(width=16, blocks=2, elements=("Cu", "Au"), vector_channels=4, cutoff=5.0, three_body_cutoff=3.2)


@pytest.fixture(scope="module")
def model() -> Potential:
    torch.manual_seed(1)
    model = Potential(CFG).double()
    with torch.no_grad():  # away from the initialisation's small vector terms, so that a wrong one shows
        for name, p in model.named_parameters():
            if ".vectors." in name:
                p.mul_(4.0)
    return model


def predict(model: Potential, atoms: Atoms, training: bool = False):
    batch = batch_from_atoms([atoms], model.species_table(), CFG.cutoff, CFG.three_body_cutoff)
    return energy_forces_stress(model, batch.to("cpu", torch.float64), training=training)


def cell() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True).repeat((2, 1, 1))
    atoms.numbers[[1, 6]] = 79
    atoms.rattle(0.12, seed=3)
    return atoms


def test_energy_invariant_and_forces_equivariant_under_rotation(model):
    atoms = cell()
    before = predict(model, atoms)
    rot = Rotation.from_euler("xyz", [0.4, -1.2, 2.1]).as_matrix()
    turned = atoms.copy()
    turned.positions = atoms.positions @ rot.T
    turned.cell = atoms.cell.array @ rot.T
    after = predict(model, turned)
    assert float(after.energy_G[0]) == pytest.approx(float(before.energy_G[0]), rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(after.forces_N3.detach().numpy(), before.forces_N3.detach().numpy() @ rot.T,
                               atol=1e-11)


def test_vectors_change_the_energy(model):
    """The vector path is live: without it (same weights elsewhere) the energy differs."""
    atoms = cell()
    with_vectors = float(predict(model, atoms).energy_G[0])
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if ".vectors.coefficients." in n}
    try:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    p.zero_()
        without = float(predict(model, atoms).energy_G[0])
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
    assert abs(with_vectors - without) > 1e-4


def test_forces_and_stress_are_derivatives_of_the_energy(model):
    atoms = cell()
    pred = predict(model, atoms)
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
        / 2 / atoms.get_volume()  # the xy and yx entries both moved
    assert abs(numeric_xy - float(pred.stress_G6[0, 5])) < 1e-8


def test_energy_smooth_as_a_bond_leaves_the_cutoff(model):
    """A third atom moves out through the atom graph's cutoff (beyond the three-body one, where only the
    vector path sees its direction): the energy's steps shrink with the step size, no jump at r_c."""
    def energy(d: float) -> float:
        atoms = Atoms("CuAuCu", positions=[[0, 0, 0], [2.4, 0, 0], [0.3, d, 0.2]])
        return float(predict(model, atoms).energy_G[0])

    rc = CFG.cutoff
    ds = np.linspace(rc - 0.02, rc + 0.02, 41)
    steps = np.abs(np.diff([energy(d) for d in ds]))
    assert steps.max() < 1e-6
    assert energy(rc + 0.01) == pytest.approx(energy(rc + 0.3), abs=1e-14)


def test_force_training_reaches_the_vector_layers(model):
    pred = predict(model, cell(), training=True)
    model.zero_grad()
    (pred.forces_N3.pow(2).sum() + pred.stress_G6.pow(2).sum()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if ".vectors." in n}
    assert len(grads) == 2 * 3 + 2  # per block: coefficients (weight, bias), left, right
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads.values())


def test_vector_channels_belong_to_the_light_block():
    with pytest.raises(ConfigError, match="vector_channels"):
        validate(Config(model=ModelConfig(block="matris", vector_channels=4), data=DataConfig(train=("x.bp",))))
    with pytest.raises(ConfigError, match="vector_channels"):
        validate(Config(model=ModelConfig(vector_channels=-1), data=DataConfig(train=("x.bp",))))
