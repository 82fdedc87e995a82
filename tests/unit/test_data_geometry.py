"""Structures the model cannot evaluate are refused where they enter — at convert (file, frame and
field named, exit 2, no dataset written) and in the ASE calculator — instead of failing later in
train or predict: coincident atoms, a periodic cell without volume, mixed periodicity."""

from __future__ import annotations

import re

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from conftest import run_cli
from exaforce.calculator import ExaforceCalculator
from exaforce.io.schema import DataError, Frames

pytestmark = pytest.mark.data


def labelled(atoms: Atoms, stress: bool = False) -> Atoms:
    n = len(atoms)
    atoms.calc = SinglePointCalculator(atoms, energy=-1.0, forces=np.zeros((n, 3)),
                                       **({"stress": np.zeros(6)} if stress else {}))
    return atoms


def good() -> Atoms:
    return labelled(bulk("Cu", "fcc", a=3.6, cubic=True), stress=True)


def coincident() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.positions[2] = atoms.positions[1]
    return labelled(atoms)


def flat_cell() -> Atoms:
    return labelled(Atoms("Cu2", positions=[[0, 0, 0], [1.2, 1.3, 0]], cell=[[3, 0, 0], [0, 3, 0], [0, 0, 0]],
                          pbc=True), stress=True)


def slab_without_vacuum() -> Atoms:
    """A slab whose cell has no vector across the vacuum: no volume for the stress."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.cell[2] = 0.0
    atoms.pbc = (True, True, False)
    return labelled(atoms)


def own_image() -> Atoms:
    return labelled(Atoms("Cu", positions=[[0, 0, 0]], cell=[3, 3, 0.05], pbc=True))


def coincident_through_the_boundary() -> Atoms:
    """Atom 2 sits on an image of atom 0 in a skewed cell (a lattice translation away, plus 0.02 Å)."""
    cell = np.array([[4.0, 0, 0], [2.0, 3.5, 0], [1.0, 1.0, 3.0]])
    positions = [[0.01, 0.01, 0.01], [1.0, 1.0, 1.0], np.add([0.03, 0.01, 0.01], cell[0] + cell[1] - cell[2])]
    return labelled(Atoms("Cu3", positions=positions, cell=cell, pbc=True))


CASES = {"coincident": (coincident, "positions", "atoms 1 and 2 are 0 Å apart"),
         "flat-cell": (flat_cell, "cell", "periodic cell without volume"),
         "slab": (slab_without_vacuum, "cell", "periodic cell without volume (|det| = 0 Å³); a slab or wire needs"),
         "through-the-boundary": (coincident_through_the_boundary, "positions", "atoms 0 and 2 are 0.02 Å apart"),
         "own-image": (own_image, "cell", "every atom is 0.05 Å from its own periodic image")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_frames_refuse_and_name_the_frame_and_field(case):
    make, field, message = CASES[case]
    with pytest.raises(DataError, match=re.escape(f"in.extxyz: frame 1: field '{field}': {message}")):
        Frames.from_atoms([good(), make()], "in.extxyz")


@pytest.mark.parametrize("case", ["coincident", "slab"])
def test_convert_refuses_with_exit_2_and_writes_nothing(case, tmp_path):
    make, field, message = CASES[case]
    write(tmp_path / "in.extxyz", [good(), make()])
    result = run_cli(["data", "convert", "in.extxyz", "--out", "out.bp", "--name", "x"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"in.extxyz: frame 1: field '{field}': {message}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out.bp").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.extxyz"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_calculator_refuses(case):
    make, field, message = CASES[case]
    atoms = make()
    atoms.calc = ExaforceCalculator.from_preset("small", elements=("Cu",))
    with pytest.raises(DataError, match=re.escape(f"field '{field}': {message}")):
        atoms.get_potential_energy()


def test_a_slab_with_its_vacuum_vector_is_accepted(tmp_path):
    """pbc = (True, True, False) with a cell across the vacuum: converted (pbc kept) and evaluated."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    atoms.center(vacuum=5.0, axis=2)
    atoms.pbc = (True, True, False)
    atoms.rattle(0.05, seed=0)
    write(tmp_path / "in.extxyz", [good(), labelled(atoms)])
    result = run_cli(["data", "convert", "in.extxyz", "--out", "out.bp", "--name", "x"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    atoms.calc = ExaforceCalculator.from_preset("small", elements=("Cu",))
    assert np.isfinite(atoms.get_potential_energy()) and np.isfinite(atoms.get_stress()).all()


def test_a_label_that_is_not_numeric_names_its_field():
    atoms = good()
    atoms.calc.results["energy"] = "high"
    with pytest.raises(DataError, match="frame 0: field 'energy': not numeric"):
        Frames.from_atoms([atoms], "in.extxyz")
