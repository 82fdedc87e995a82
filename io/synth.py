"""Synthetic labelled data: small strained, rattled metal and alloy cells labelled by ASE's EMT.

Why: tests, tutorials and scaling runs need a data set that is generated in seconds, anywhere,
with exact labels (energy, forces, stress) from a cheap but real potential. EMT covers exactly
the seven fcc metals below, so every alloy of them has a physically sensible label.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import atomic_numbers, reference_states

ELEMENTS = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")
LATTICES = ("fcc", "bcc", "hcp")
MAX_STRAIN = 0.03          # |ε_ij| ≤ 3 %
LATTICE_JITTER = 0.03      # lattice constant scaled by 1 ± 3 %
RATTLE_SIGMA_A = (0.05, 0.1)  # Å, drawn per structure


def synthesize(
    n_structures: int, seed: int, progress: Callable[[int, int], None] | None = None
) -> list[Atoms]:
    """`n_structures` EMT-labelled periodic cells of 1–32 atoms, identical for the same seed.

    `progress(done, total)` is called after each structure (for a CLI progress line).
    """
    return labelled_cells(_random_structure, n_structures, seed, progress)


def labelled_cells(make_cell: Callable[[np.random.Generator], Atoms], n_structures: int, seed: int,
                   progress: Callable[[int, int], None] | None = None) -> list[Atoms]:
    """`n_structures` cells from `make_cell` (one random generator seeded `seed`), EMT-labelled."""
    if n_structures < 0:
        raise ValueError(f"n_structures = {n_structures}: must be >= 0")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_structures):
        out.append(_labelled(make_cell(rng)))
        if progress is not None:
            progress(i + 1, n_structures)
    return out


def fcc_lattice_constant(symbol: str) -> float:
    """Experimental fcc lattice constant (Å) from ASE's reference states."""
    state = reference_states[atomic_numbers[symbol]]
    if state is None or state.get("symmetry") != "fcc":
        raise ValueError(f"{symbol}: no fcc reference state in ase.data")
    return float(state["a"])


def _random_structure(rng: np.random.Generator) -> Atoms:
    """One random unlabelled cell: lattice, composition, supercell, strain, rattle."""
    n_species = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
    species = [str(s) for s in rng.choice(ELEMENTS, size=n_species, replace=False)]
    lattice = str(rng.choice(LATTICES))
    # Vegard's law for the alloy, then a random ±3 % so the volume is sampled too.
    a_fcc = np.mean([fcc_lattice_constant(s) for s in species]) * (1 + rng.uniform(-LATTICE_JITTER, LATTICE_JITTER))
    atoms = _cell(species[0], lattice, a_fcc, conventional=bool(rng.integers(2)))
    atoms = atoms.repeat([int(r) for r in rng.integers(1, 3, size=3)])
    atoms.symbols = [str(s) for s in rng.choice(species, size=len(atoms))]
    _strain(atoms, rng)
    atoms.positions += rng.normal(0.0, rng.uniform(*RATTLE_SIGMA_A), size=atoms.positions.shape)
    return atoms


def _cell(symbol: str, lattice: str, a_fcc: float, conventional: bool) -> Atoms:
    """Primitive or conventional cell at the same volume per atom as the fcc cell of `a_fcc`."""
    if lattice == "fcc":
        return bulk(symbol, "fcc", a=a_fcc, cubic=conventional)
    if lattice == "bcc":
        # fcc: a³/4 per atom, bcc: a³/2 per atom.
        return bulk(symbol, "bcc", a=a_fcc / 2 ** (1 / 3), cubic=conventional)
    # Ideal hcp has the fcc nearest-neighbour distance a/√2 and c/a = √(8/3).
    a_hcp = a_fcc / np.sqrt(2)
    return bulk(symbol, "hcp", a=a_hcp, c=a_hcp * np.sqrt(8 / 3), orthorhombic=conventional)


def _strain(atoms: Atoms, rng: np.random.Generator) -> None:
    """Apply a random symmetric strain with every component in ±MAX_STRAIN."""
    eps = rng.uniform(-MAX_STRAIN, MAX_STRAIN, size=(3, 3))
    eps = 0.5 * (eps + eps.T)
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)


def _labelled(atoms: Atoms) -> Atoms:
    """EMT energy, forces and stress frozen in a SinglePointCalculator so they survive writing."""
    atoms.calc = EMT()
    labels = {
        "energy": atoms.get_potential_energy(),
        "forces": atoms.get_forces(),
        "stress": atoms.get_stress(voigt=True),
    }
    atoms.calc = SinglePointCalculator(atoms, **labels)
    return atoms
