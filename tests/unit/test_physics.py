"""Forces and stress are exact derivatives of the energy (float64, periodic and finite systems)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

from exaforce.config import ModelConfig
from exaforce.graph import batch_from_atoms
from exaforce.model.potential import Potential, energy_forces_stress

pytestmark = pytest.mark.physics
CFG = ModelConfig(width=16, blocks=2, elements=("H", "C", "O", "Cu", "Au"))


@pytest.fixture(scope="module")
def model() -> Potential:
    torch.manual_seed(0)
    m = Potential(CFG).double()
    with torch.no_grad():  # non-trivial readout scale and references, as after fitting
        m.energy_scale_H.fill_(0.7)
        m.reference_energy_HX[0].copy_(torch.linspace(-3.0, -1.0, len(CFG.elements)))
    return m


def predict(model: Potential, atoms: Atoms):
    batch = batch_from_atoms([atoms], model.species_table(), CFG.cutoff, CFG.three_body_cutoff)
    return energy_forces_stress(model, batch.to("cpu", torch.float64), training=False)


def cu_au_cell() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True).repeat((2, 1, 1))
    atoms.numbers[[1, 4]] = 79
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + [[0.02, 0.01, 0], [0.01, -0.01, 0.015], [0, 0.015, 0.03]]),
                   scale_atoms=True)
    atoms.rattle(0.08, seed=3)
    return atoms


def strained(atoms: Atoms, eps: np.ndarray) -> Atoms:
    out = atoms.copy()
    out.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
    return out


@pytest.mark.parametrize("make", [cu_au_cell, lambda: molecule("CH3CH2OH")], ids=["CuAu-periodic", "ethanol"])
def test_forces_are_minus_energy_gradient(model, make):
    atoms = make()
    atoms.rattle(0.02, seed=7)
    forces = predict(model, atoms).forces_N3.numpy()
    h = 1e-5
    numeric = np.zeros_like(forces)
    for i in range(len(atoms)):
        for x in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[i, x] += h
            minus.positions[i, x] -= h
            numeric[i, x] = -(predict(model, plus).energy_G - predict(model, minus).energy_G).item() / (2 * h)
    assert np.abs(forces).max() > 1e-4  # forces are not trivially zero
    np.testing.assert_allclose(forces, numeric, rtol=0, atol=1e-8)  # eV/Å; central differences, h = 1e-5 Å


def test_stress_is_strain_derivative(model):
    atoms = cu_au_cell()
    stress = predict(model, atoms).stress_G6.numpy()[0]
    volume, h = atoms.get_volume(), 1e-6
    numeric = np.zeros(6)
    for k, (i, j) in enumerate([(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]):
        eps = np.zeros((3, 3))
        eps[i, j] += h / 2
        eps[j, i] += h / 2
        e_plus = predict(model, strained(atoms, eps)).energy_G.item()
        e_minus = predict(model, strained(atoms, -eps)).energy_G.item()
        numeric[k] = (e_plus - e_minus) / (2 * h) / volume
    assert np.abs(stress).max() > 1e-5
    np.testing.assert_allclose(stress, numeric, rtol=0, atol=1e-9)  # eV/Å³, finite strain ±1e-6


def test_non_periodic_stress_is_nan(model):
    assert torch.isnan(predict(model, molecule("H2O")).stress_G6).all()


def test_training_mode_keeps_graph_for_double_backward(model):
    atoms = cu_au_cell()
    batch = batch_from_atoms([atoms], model.species_table(), CFG.cutoff, CFG.three_body_cutoff)
    pred = energy_forces_stress(model, batch.to("cpu", torch.float64), training=True)
    pred.forces_N3.pow(2).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads[:3]) and any(g.abs().sum() > 0 for g in grads if g is not None)
    model.zero_grad(set_to_none=True)


def test_float32_stress_and_forces_hold_far_from_the_origin():
    """Unwrapped coordinates (an MD trajectory's atoms 1000 cells away) give float32 forces and
    stress as close to float64 as wrapped ones (issue 18: the strain was applied to positions, so
    the stress summed position-sized terms that cancel)."""
    from ase.build import bulk
    from exaforce.calculator import ExaforceCalculator

    atoms = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=1)
    far = atoms.copy()
    far.positions += np.array([1000, -700, 1300]) @ far.cell.array  # lattice translations: the same structure
    results = {}
    for dtype in ("float32", "float64"):
        calc = ExaforceCalculator.from_preset("small", seed=0, dtype=dtype, elements=("Cu",))
        calc.model.energy_scale_H.fill_(5.0)
        for name, a in (("near", atoms), ("far", far)):
            a = a.copy()
            a.calc = calc
            results[dtype, name] = (a.get_forces(), a.get_stress())
    forces64, stress64 = results["float64", "near"]
    np.testing.assert_allclose(results["float64", "far"][1], stress64, atol=1e-12)
    assert np.abs(stress64).max() > 1e-3
    for name in ("near", "far"):
        forces32, stress32 = results["float32", name]
        # float32 near the origin: 5e-9 eV/Å and 3e-10 eV/Å³; far, before the fix: 6e-6 and 2e-8
        assert np.abs(forces32 - forces64).max() < 1e-7, (name, np.abs(forces32 - forces64).max())
        assert np.abs(stress32 - stress64).max() < 2e-9, (name, np.abs(stress32 - stress64).max())


@pytest.mark.parametrize("pbc", [(True, True, False), (False, True, True)], ids=["vacuum-z", "vacuum-x"])
def test_slab_forces_and_stress_equal_finite_differences(pbc):
    """A slab (two periodic directions, vacuum across the third): forces and the stress — in-plane
    components included, from the same strain derivative — equal ASE's central differences (float64)."""
    from ase.build import fcc111
    from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
    from exaforce.calculator import ExaforceCalculator

    atoms = fcc111("Cu", size=(2, 2, 3), a=3.6, vacuum=6.0, orthogonal=False)
    atoms.numbers[[1, 6]] = 79
    atoms.rattle(0.05, seed=4)
    if not pbc[0]:  # the same slab with its vacuum along x
        atoms.set_cell(atoms.cell.array[[2, 0, 1]], scale_atoms=False)
        atoms.positions = atoms.positions[:, [2, 0, 1]]
        atoms.set_cell(atoms.cell.array[:, [2, 0, 1]], scale_atoms=False)
    atoms.pbc = pbc
    calc = ExaforceCalculator.from_preset("small", seed=3, dtype="float64", elements=("Cu", "Au"))
    calc.model.energy_scale_H.fill_(5.0)
    atoms.calc = calc
    forces, stress = atoms.get_forces(), atoms.get_stress()
    assert np.abs(forces).max() > 1e-3 and np.abs(stress).max() > 1e-5
    np.testing.assert_allclose(forces, calculate_numerical_forces(atoms, eps=1e-5), atol=1e-7)
    np.testing.assert_allclose(stress, calculate_numerical_stress(atoms, eps=1e-6), atol=1e-8)
