"""Symmetries and smoothness of the potential (float64, random weights of the `small` preset)."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from scipy.spatial.transform import Rotation

from exaforce.calculator import ExaforceCalculator

pytestmark = pytest.mark.physics
ELEMENTS = ("H", "C", "O", "Cu", "Au")


@pytest.fixture(scope="module")
def calc() -> ExaforceCalculator:
    c = ExaforceCalculator.from_preset("small", seed=1, dtype="float64", elements=ELEMENTS)
    c.model.energy_scale_H.fill_(0.8)
    return c


def alloy() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.65).repeat((2, 2, 2))
    atoms.numbers[[0, 3, 5]] = 79
    atoms.rattle(0.07, seed=2)
    return atoms


def evaluate(calc, atoms: Atoms):
    atoms = atoms.copy()
    atoms.calc = calc
    stress = atoms.get_stress() if atoms.pbc.all() else None
    return atoms.get_potential_energy(), atoms.get_forces(), stress


def test_ase_numerical_forces_and_stress(calc):
    atoms = alloy()
    atoms.calc = calc
    np.testing.assert_allclose(atoms.get_forces(), calculate_numerical_forces(atoms, eps=1e-5), atol=1e-8)
    np.testing.assert_allclose(atoms.get_stress(), calculate_numerical_stress(atoms, eps=1e-6), atol=1e-9)


@pytest.mark.parametrize("make", [alloy, lambda: molecule("CH3CH2OH")], ids=["periodic", "molecule"])
def test_rotation_translation_permutation(calc, make):
    atoms = make()
    e0, f0, s0 = evaluate(calc, atoms)
    rot = Rotation.from_euler("xyz", [0.3, -1.1, 2.0]).as_matrix()
    moved = atoms.copy()
    moved.positions = atoms.positions @ rot.T + [0.7, -2.3, 1.1]
    if atoms.pbc.all():
        moved.cell = atoms.cell.array @ rot.T
    e1, f1, s1 = evaluate(calc, moved)
    assert e1 == pytest.approx(e0, rel=1e-10, abs=1e-10)
    np.testing.assert_allclose(f1, f0 @ rot.T, atol=1e-10)  # forces rotate with the structure
    perm = np.random.default_rng(0).permutation(len(atoms))
    e2, f2, _ = evaluate(calc, atoms[perm])
    assert e2 == pytest.approx(e0, rel=1e-10, abs=1e-10)
    np.testing.assert_allclose(f2, f0[perm], atol=1e-10)


def test_extensive_under_supercell(calc):
    atoms = alloy()
    e1, f1, s1 = evaluate(calc, atoms)
    e8, f8, s8 = evaluate(calc, atoms.repeat((2, 2, 2)))
    assert e8 == pytest.approx(8 * e1, rel=1e-10)
    np.testing.assert_allclose(f8[: len(atoms)], f1, atol=1e-10)
    np.testing.assert_allclose(s8, s1, atol=1e-12)  # stress is intensive


@pytest.mark.parametrize("cutoff_name", ["cutoff", "three_body_cutoff"])
def test_energy_continuous_across_each_cutoff(calc, cutoff_name):
    """Atom 1 moves through the cutoff of its bond to atom 0 (a spectator keeps a triplet alive):
    energy and force change no more than their slopes allow, so there is no jump."""
    rc = getattr(calc.model.cfg, cutoff_name)

    def energy_force(d: float) -> tuple[float, float]:
        e, f, _ = evaluate(calc, Atoms("CuAuCu", positions=[[0, 0, 0], [d, 0, 0], [0.0, 2.3, 0.0]]))
        return e, f[1, 0]

    for delta in (1e-3, 1e-5, 1e-7):  # Å either side of the cutoff
        (e_in, f_in), (e_out, f_out) = energy_force(rc - delta), energy_force(rc + delta)
        # |ΔE| ≤ 2δ·max|F| (mean value theorem) up to rounding; a jump J would break it once 2δ|F| < J.
        assert abs(e_out - e_in) <= 2 * delta * max(abs(f_in), abs(f_out)) * 1.01 + 1e-12, (delta, e_out - e_in)
        assert abs(f_out - f_in) <= 20 * delta + 1e-10  # eV/Å: |ΔF| ≤ 2δ·|∂F/∂r|, |∂F/∂r| < 10 eV/Å²
    if cutoff_name == "cutoff":
        assert energy_force(rc + 1e-7)[1] == 0.0  # beyond the cutoff the pair does not interact
