"""tblite-labelled molecules: deterministic, non-periodic, labels exactly what tblite computes."""

import sys

import numpy as np
import pytest
from ase.calculators.calculator import CalculationFailed
from conftest import run_cli
from tblite.ase import TBLite  # pinned in envs/local/requirements.txt: missing means a broken venv

from exaforce.io import molecules
from exaforce.io.bp import open_bp
from exaforce.io.molecules import ACCURACY, ELEMENTS, METHODS, synthesize_molecules
from exaforce.io.schema import Frames

pytestmark = pytest.mark.data


def _equal(a: Frames, b: Frames) -> bool:
    return a.optional == b.optional and all(np.array_equal(x, getattr(b, f), equal_nan=True)
                                            for f, x in a.columns().items())


def _fresh_energy(atoms, method: str, i: int = 0, k: int = 0, step_A: float = 0.0) -> float:
    moved = atoms.copy()
    moved.positions[i, k] += step_A
    moved.calc = TBLite(method=method, charge=0, multiplicity=1, accuracy=ACCURACY, verbosity=0)
    return moved.get_potential_energy()


def test_same_seed_same_data_other_seed_other_data():
    first, again, other = (Frames.from_atoms(synthesize_molecules(6, seed)) for seed in (7, 7, 8))
    assert _equal(first, again)
    assert not _equal(first, other)


def test_molecules_are_in_vacuum_without_stress_and_from_the_elements():
    atoms_list = synthesize_molecules(20, seed=1, method="GFN1-xTB")
    frames = Frames.from_atoms(atoms_list)
    assert not frames.pbc_S3.any() and not frames.cell_S33.any()
    assert np.isnan(frames.stress_S6).all()
    assert set().union(*(a.get_chemical_symbols() for a in atoms_list)) <= set(ELEMENTS)
    assert frames.natoms_S.min() >= 2 and len(set(frames.natoms_S.tolist())) >= 4
    assert np.abs(frames.forces_N3).max() > 0.1  # rattled away from the G2 minimum


def test_labels_equal_a_fresh_tblite_calculation():
    atoms = synthesize_molecules(3, seed=3)[-1]
    fresh = atoms.copy()
    fresh.calc = TBLite(method="GFN2-xTB", charge=0, multiplicity=1, accuracy=ACCURACY, verbosity=0)
    np.testing.assert_allclose(atoms.get_potential_energy(), fresh.get_potential_energy(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(atoms.get_forces(), fresh.get_forces(), rtol=0, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_forces_are_minus_the_energy_gradient(method):
    atoms = synthesize_molecules(1, seed=11, method=method)[0]
    h = 1e-3  # Å; five-point stencil, truncation error O(h⁴) ~ 1e-8 eV/Å
    fd_N3 = np.zeros((len(atoms), 3))
    for i in range(len(atoms)):
        for k in range(3):
            e = {s: _fresh_energy(atoms, method, i, k, s * h) for s in (-2, -1, 1, 2)}
            fd_N3[i, k] = -(8 * (e[1] - e[-1]) - (e[2] - e[-2])) / (12 * h)
    # Measured ~1e-6 eV/Å at ACCURACY = 0.01 (tblite's default 1.0 gives ~2e-4).
    np.testing.assert_allclose(atoms.get_forces(), fd_N3, rtol=0, atol=1e-5)


def test_gfn1_and_gfn2_label_the_same_geometries_differently():
    gfn2, gfn1 = (synthesize_molecules(4, seed=5, method=m) for m in ("GFN2-xTB", "GFN1-xTB"))
    for a2, a1 in zip(gfn2, gfn1):
        assert np.array_equal(a2.positions, a1.positions) and np.array_equal(a2.numbers, a1.numbers)
        assert abs(a2.get_potential_energy() - a1.get_potential_energy()) > 1.0  # eV: other references
        assert np.abs(a2.get_forces() - a1.get_forces()).max() > 1e-2


def test_failed_scf_is_replaced_by_the_next_draw(monkeypatch):
    calls = []

    class FailsOnce(TBLite):
        def calculate(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise CalculationFailed("SCF not converged (injected)")
            super().calculate(*args, **kwargs)

    monkeypatch.setattr(molecules, "_tblite_calculator_class", lambda: FailsOnce)
    with pytest.warns(RuntimeWarning, match="injected"):
        replaced = synthesize_molecules(3, seed=2)
    reference = synthesize_molecules(4, seed=2)
    assert _equal(Frames.from_atoms(replaced), Frames.from_atoms(reference[1:]))


def test_missing_tblite_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tblite.ase", None)  # makes `from tblite.ase import …` fail
    with pytest.raises(ModuleNotFoundError, match="tblite==0.8.0") as info:
        synthesize_molecules(1, seed=0)
    assert info.value.name == "tblite"


def test_bad_method_is_refused():
    with pytest.raises(ValueError, match="GFN3-xTB"):
        synthesize_molecules(1, seed=0, method="GFN3-xTB")


def test_cli_synth_molecules_converts_to_bp(tmp_path):
    xyz, bp = tmp_path / "mol.extxyz", tmp_path / "mol.bp"
    proc = run_cli(["data", "synth", "--source", "molecules", "--method", "GFN1-xTB", "--out", str(xyz),
                    "--structures", "8", "--seed", "4"], timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 8 structures" in proc.stdout  # (progress lines only for work longer than a few seconds)
    proc = run_cli(["data", "convert", str(xyz), "--out", str(bp), "--name", "gfn1"], timeout=60)
    assert proc.returncode == 0, proc.stderr
    with open_bp(bp) as ds:
        stored = ds.read(0, ds.n_structures)
    assert _equal(stored, Frames.from_atoms(synthesize_molecules(8, seed=4, method="GFN1-xTB")))


def test_cli_method_needs_molecules(tmp_path):
    proc = run_cli(["data", "synth", "--method", "GFN1-xTB", "--out", str(tmp_path / "m.extxyz")], timeout=60)
    assert proc.returncode == 2
    assert "--method GFN1-xTB: only for --source molecules" in proc.stderr
    assert not (tmp_path / "m.extxyz").exists()


def test_labels_do_not_depend_on_the_thread_count(tmp_path):
    """The synthesiser runs tblite on one thread whatever OMP_NUM_THREADS says: the same bytes."""
    import os
    import subprocess

    texts = []
    for threads in ("1", "2"):
        out = tmp_path / f"mol-{threads}.extxyz"
        proc = subprocess.run([sys.executable, "-m", "exaforce.cli", "data", "synth", "--source", "molecules",
                               "--out", str(out), "--structures", "6", "--seed", "9"], capture_output=True, text=True,
                              timeout=120, env=dict(os.environ, OMP_NUM_THREADS=threads))
        assert proc.returncode == 0, proc.stderr
        texts.append(out.read_text())
    assert texts[0] == texts[1]
