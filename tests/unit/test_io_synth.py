"""Synthetic EMT data: deterministic, small, labelled with exactly what EMT computes."""

import time

import numpy as np
import pytest
from ase.calculators.emt import EMT

from exaforce.io.schema import Frames
from exaforce.io.synth import ELEMENTS, synthesize

pytestmark = pytest.mark.data


def _equal(a: Frames, b: Frames) -> bool:
    return a.optional == b.optional and all(np.array_equal(x, getattr(b, f), equal_nan=True)
                                            for f, x in a.columns().items())


def test_same_seed_same_data_other_seed_other_data():
    first, again, other = (Frames.from_atoms(synthesize(20, seed)) for seed in (7, 7, 8))
    assert _equal(first, again)
    assert not _equal(first, other)


def test_cells_are_small_periodic_and_from_the_emt_metals():
    atoms_list = synthesize(60, seed=1)
    sizes = [len(a) for a in atoms_list]
    assert min(sizes) >= 1 and max(sizes) <= 32
    assert len(set(sizes)) >= 4, "expected a mix of primitive, conventional and supercells"
    assert all(a.pbc.all() for a in atoms_list)
    assert set().union(*(a.get_chemical_symbols() for a in atoms_list)) <= set(ELEMENTS)
    assert any(len(set(a.get_chemical_symbols())) >= 2 for a in atoms_list), "expected alloys"


def test_labels_equal_an_emt_recomputation():
    for atoms in synthesize(12, seed=3)[-2:]:
        stored = (atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress())
        fresh = atoms.copy()
        fresh.calc = EMT()
        np.testing.assert_allclose(stored[0], fresh.get_potential_energy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(stored[1], fresh.get_forces(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(stored[2], fresh.get_stress(), rtol=0, atol=1e-12)


def test_structures_are_rattled_and_strained():
    frames = Frames.from_atoms(synthesize(30, seed=2))
    multi_atom = np.repeat(frames.natoms_S > 1, frames.natoms_S)
    assert np.abs(frames.forces_N3[multi_atom]).max() > 1e-3  # rattle breaks symmetry
    assert not np.isnan(frames.stress_S6).any()
    assert np.abs(frames.stress_S6[:, 3:]).max() > 1e-5  # shear strain gives shear stress


def test_progress_is_reported_and_200_structures_are_fast():
    calls = []
    t0 = time.perf_counter()
    synthesize(200, seed=0, progress=lambda done, total: calls.append((done, total)))
    assert time.perf_counter() - t0 < 10.0
    assert calls == [(i, 200) for i in range(1, 201)]
