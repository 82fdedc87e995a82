"""The structures `exaforce bench step` trains on: dense periodic metal cells (default) or `data synth`'s.

Why: a step's cost and memory grow with edges and triplets, and those depend on density. The
`data synth` seed-0 cells hold ~10 atoms, fewer than one 6 Å neighbour shell, so a benchmark on
them times mostly overhead. The `dense` workload is what a production data set of bulk metals looks
like: fcc, bcc and hcp supercells of 32–108 atoms of the seven EMT metals and their random
substitutional alloys, at their reference density (ASE's fcc lattice constants, Vegard's law for
alloys; bcc and ideal hcp at the same volume per atom), symmetrically strained by up to ±3 %,
rattled by a Gaussian of 0.05–0.15 Å, labelled by EMT. The cells of a seed are a prefix-stable
sequence: the first b cells of `dense_cells(8, s)` are `dense_cells(b, s)`, so batch sizes nest.

Measured with `exaforce.graph.build_batch` (cutoffs 6 Å and 4 Å) on `dense_cells(n, seed=0)`: 60.6
neighbours per atom within 6 Å and 252 triplets per atom within 4 Å over n = 32 cells (1,986 atoms;
n = 4: 288 atoms, 61.9 and 254; n = 8: 588 atoms, 60.5 and 250). More than the ≈57 and ≈200 first
guessed: the Cu/Ni/Pd/Pt second fcc shell (a ≈ 3.5–3.9 Å) lies inside the 4 Å three-body cutoff.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from ase import Atoms

from exaforce.io.synth import ELEMENTS, _cell, _strain, fcc_lattice_constant, labelled_cells, synthesize

WORKLOADS = ("dense", "small", "skewed")
SKEWED = {"Cu": 0.4, "Au": 0.4}  # the `skewed` workload: 80 % of atoms from two elements, the rest spread
MIN_ATOMS, MAX_ATOMS = 32, 108
RATTLE_SIGMA_A = (0.05, 0.15)  # Å, drawn per structure

# Conventional cells (atoms each) and the supercell repeats that land in 32–108 atoms.
CELL_ATOMS = {"fcc": 4, "bcc": 2, "hcp": 4}
REPEATS = {lattice: [(a, b, c) for a in range(1, 6) for b in range(1, 6) for c in range(1, 6)
                     if MIN_ATOMS <= n * a * b * c <= MAX_ATOMS and max(a, b, c) - min(a, b, c) <= 1]
           for lattice, n in CELL_ATOMS.items()}


def workload_structures(workload: str, n_structures: int, seed: int,
                        progress: Callable[[int, int], None] | None = None) -> list[Atoms]:
    """`n_structures` EMT-labelled cells of the named workload: `dense`, `small` (`data synth`'s
    metals) or `skewed` (dense cells, 80 % of atoms Cu or Au); `progress(done, total)` after each."""
    if workload == "small":
        return synthesize(n_structures, seed=seed, progress=progress)
    if workload not in WORKLOADS:
        raise ValueError(f"workload = {workload!r}: must be one of {', '.join(WORKLOADS)}")
    return labelled_cells(_dense_cell if workload == "dense" else _skewed_cell, n_structures, seed, progress)


def dense_cells(n_structures: int, seed: int) -> list[Atoms]:
    """`n_structures` dense periodic cells of 32–108 atoms, identical for the same seed."""
    return workload_structures("dense", n_structures, seed)


def _skewed_cell(rng: np.random.Generator) -> Atoms:
    """A dense cell whose atoms are drawn one by one: `SKEWED`'s elements with their probabilities, the
    other EMT metals sharing the rest (the composition `bench ep --skew` balances experts on)."""
    others = [s for s in ELEMENTS if s not in SKEWED]
    symbols = list(SKEWED) + others
    weights = list(SKEWED.values()) + [(1 - sum(SKEWED.values())) / len(others)] * len(others)
    lattice = str(rng.choice(list(CELL_ATOMS)))
    repeat = REPEATS[lattice][int(rng.integers(len(REPEATS[lattice])))]
    atoms = _cell("Cu", lattice, 1.0, conventional=True).repeat(repeat)
    atoms.symbols = [str(s) for s in rng.choice(symbols, size=len(atoms), p=weights)]
    a_fcc = float(np.mean([fcc_lattice_constant(s) for s in atoms.get_chemical_symbols()]))  # Vegard's law
    atoms.set_cell(atoms.cell.array * a_fcc, scale_atoms=True)
    _strain(atoms, rng)
    atoms.positions += rng.normal(0.0, rng.uniform(*RATTLE_SIGMA_A), size=atoms.positions.shape)
    return atoms


def _dense_cell(rng: np.random.Generator) -> Atoms:
    """One unlabelled cell: lattice, composition, supercell, strain, rattle."""
    lattice = str(rng.choice(list(CELL_ATOMS)))
    n_species = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
    species = [str(s) for s in rng.choice(ELEMENTS, size=n_species, replace=False)]
    a_fcc = float(np.mean([fcc_lattice_constant(s) for s in species]))  # Vegard's law
    repeat = REPEATS[lattice][int(rng.integers(len(REPEATS[lattice])))]
    atoms = _cell(species[0], lattice, a_fcc, conventional=True).repeat(repeat)
    atoms.symbols = [str(s) for s in rng.choice(species, size=len(atoms))]
    _strain(atoms, rng)
    atoms.positions += rng.normal(0.0, rng.uniform(*RATTLE_SIGMA_A), size=atoms.positions.shape)
    return atoms
