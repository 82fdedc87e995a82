"""Labelled molecules: rotated, rattled G2 molecules labelled by GFN2-xTB or GFN1-xTB (tblite).

Why: a second real data source next to the EMT metals (`exaforce.io.synth`), non-periodic and
chemically different, with two fidelities of the same family, so multi-fidelity training has
something to tell apart. tblite labels a small molecule in milliseconds on one core.

Labels: `energy` is tblite's total energy in eV (not an atomization energy: GFN1 and GFN2 have
different references, tens of eV apart for the same molecule); `forces` are tblite's analytic
gradient in eV/Å (equal to -dE/dx to ~1e-6 eV/Å, see ACCURACY). No stress: the molecules sit
in vacuum (pbc False, zero cell).

tblite is pinned in envs/local/requirements.txt but imported only here, only when labelling.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from ase import Atoms
from ase.calculators.calculator import CalculationFailed
from ase.calculators.singlepoint import SinglePointCalculator
from ase.collections import g2

METHODS = ("GFN2-xTB", "GFN1-xTB")
# Main-group elements both GFN parametrizations describe well; leaves out the alkali and
# alkaline-earth metals and Al of G2 (ionic diatomics such as LiF, NaCl, AlCl3).
ELEMENTS = ("H", "B", "C", "N", "O", "F", "Si", "P", "S", "Cl")
# σ = 0.1 Å compresses an X-H bond by 0.3 Å now and then: median max |F| per conformer ~6 eV/Å,
# 99th percentile ~30 eV/Å, largest seen ~60 eV/Å (500 conformers, both methods).
RATTLE_SIGMA_A = (0.05, 0.1)  # Å, Gaussian σ per Cartesian component, drawn per structure
# tblite's default accuracy 1.0 stops the SCF early enough that its analytic forces differ from
# -dE/dx by up to ~2e-4 eV/Å; 0.01 brings that to ~1e-6 eV/Å at no measurable extra cost (~3 ms a
# molecule either way, measured on G2 conformers).
ACCURACY = 0.01
MAX_SCF_FAILURES = 10          # consecutive replacements before we call the set-up broken
INSTALL_HINT = "run envs/local/setup.sh, or pip install tblite==0.8.0 cffi==2.1.1 pycparser==3.12"


def molecule_names() -> list[str]:
    """Closed-shell, neutral G2 molecules of ≥ 2 atoms made of ELEMENTS, in G2's fixed order.

    Closed shell (no initial magnetic moments, even electron count) so every label is a
    singlet with charge 0 and no spin state has to be guessed.
    """
    names = []
    for name in g2.names:
        atoms = g2[name]
        if (len(atoms) >= 2 and set(atoms.get_chemical_symbols()) <= set(ELEMENTS)
                and not atoms.get_initial_magnetic_moments().any()
                and not atoms.get_initial_charges().any() and int(atoms.numbers.sum()) % 2 == 0):
            names.append(name)
    return names


def synthesize_molecules(
    n_structures: int,
    seed: int,
    method: str = "GFN2-xTB",
    progress: Callable[[int, int], None] | None = None,
) -> list[Atoms]:
    """`n_structures` tblite-labelled molecular conformers, identical for the same seed and method.

    Each is a random G2 molecule, randomly rotated about its centre of mass and rattled.
    `progress(done, total)` is called after each structure (for a CLI progress line).
    """
    if n_structures < 0:
        raise ValueError(f"n_structures = {n_structures}: must be >= 0")
    if method not in METHODS:
        raise ValueError(f"method = {method!r}: must be one of {', '.join(METHODS)}")
    calculator = _tblite_calculator_class()
    with _one_thread():
        return _draw(n_structures, seed, method, calculator, progress)


def _one_thread():
    """tblite's SCF on one thread (OpenMP and BLAS): its sums reduce in a thread-count-dependent
    order, so labels would differ in the last bits between machines and OMP_NUM_THREADS."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


def _draw(n_structures: int, seed: int, method: str, calculator: type,
          progress: Callable[[int, int], None] | None) -> list[Atoms]:
    names = molecule_names()
    rng = np.random.default_rng(seed)
    out = []
    failures = 0
    while len(out) < n_structures:
        atoms = _random_conformer(g2[str(rng.choice(names))], rng)
        try:
            out.append(_labelled(atoms, calculator, method))
        except CalculationFailed as err:
            # SCF did not converge (or tblite rejected the geometry): replace the conformer by the
            # next draw of the same generator, so the set stays a function of the seed. None of the
            # molecules failed in testing; a run of failures means a broken install, not bad luck.
            failures += 1
            if failures > MAX_SCF_FAILURES:
                raise RuntimeError(f"{method}: {failures} consecutive tblite failures, last on "
                                   f"{atoms.get_chemical_formula()}: {err}") from err
            warnings.warn(f"{method} failed on a {atoms.get_chemical_formula()} conformer ({err}); "
                          f"replaced by another", RuntimeWarning, stacklevel=2)
            continue
        failures = 0
        if progress is not None:
            progress(len(out), n_structures)
    return out


def _tblite_calculator_class() -> type:
    """tblite's ASE calculator, or a ModuleNotFoundError that says how to install it."""
    try:
        from tblite.ase import TBLite
    except ImportError as err:
        raise ModuleNotFoundError(f"molecule labels need tblite, which is not importable ({err}): "
                                  f"{INSTALL_HINT}", name="tblite") from err
    return TBLite


def _random_conformer(atoms: Atoms, rng: np.random.Generator) -> Atoms:
    """Random rotation about the centre of mass, then a Gaussian rattle; vacuum, no cell."""
    atoms = Atoms(atoms.numbers, positions=atoms.positions - atoms.get_center_of_mass())
    atoms.positions = atoms.positions @ _random_rotation(rng).T
    atoms.positions += rng.normal(0.0, rng.uniform(*RATTLE_SIGMA_A), size=atoms.positions.shape)
    return atoms


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Haar-uniform 3x3 rotation: QR of a Gaussian matrix with R's diagonal signs folded into Q
    (Mezzadri, "How to generate random matrices from the classical compact groups", 2007)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:  # a reflection: flip one axis to land in SO(3)
        q[:, 0] = -q[:, 0]
    return q


def _labelled(atoms: Atoms, calculator: type, method: str) -> Atoms:
    """tblite energy and forces frozen in a SinglePointCalculator so they survive writing.

    A fresh calculator per structure: a reused TBLite starts its SCF from the previous
    molecule's density, which would make the labels depend on the order of generation.
    """
    atoms.calc = calculator(method=method, charge=0, multiplicity=1, accuracy=ACCURACY, verbosity=0)
    labels = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
    atoms.calc = SinglePointCalculator(atoms, **labels)
    return atoms
