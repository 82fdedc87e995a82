"""The in-memory form of a labelled dataset: columnar arrays, one row per atom or per structure.

Shapes: S structures, N atoms in total (all structures concatenated).
Units: Å, eV, eV/Å, eV/Å³; stress in Voigt order xx, yy, zz, yz, xz, xy with ASE's sign
(stress = (1/V)·∂E/∂ε, positive under tension).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCHEMA_VERSION = 1
VOIGT_ORDER = ("xx", "yy", "zz", "yz", "xz", "xy")


class DataError(ValueError):
    """Bad input data. The message always names the file, and the frame/sample and field when known."""

    def __init__(self, path: object, message: str, *, frame: int | None = None, field: str | None = None):
        where = str(path)
        if frame is not None:
            where += f": frame {frame}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {message}")
        self.path, self.frame, self.field = str(path), frame, field


@dataclass
class Frames:
    """S labelled structures stored column-wise so a contiguous range of them is one hyperslab."""

    numbers_N: np.ndarray    # int64 atomic numbers
    positions_N3: np.ndarray  # float64 Å
    forces_N3: np.ndarray     # float64 eV/Å
    cell_S33: np.ndarray      # float64 Å, rows are lattice vectors (zeros where non-periodic)
    pbc_S3: np.ndarray        # bool
    energy_S: np.ndarray      # float64 eV (total energy)
    stress_S6: np.ndarray     # float64 eV/Å³, Voigt; NaN rows where a structure has no stress
    natoms_S: np.ndarray      # int64

    @property
    def offsets_S(self) -> np.ndarray:
        """Index of each structure's first atom in the per-atom arrays."""
        return np.concatenate([[0], np.cumsum(self.natoms_S)[:-1]]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.natoms_S)

    @property
    def n_atoms(self) -> int:
        return int(self.natoms_S.sum())

    def select(self, indices: np.ndarray) -> "Frames":
        """The structures at `indices`, in that order, as a new Frames."""
        indices = np.asarray(indices, dtype=np.int64)
        offsets = self.offsets_S
        atom_idx = np.concatenate(
            [np.arange(offsets[s], offsets[s] + self.natoms_S[s]) for s in indices]
        ) if len(indices) else np.zeros(0, dtype=np.int64)
        return Frames(
            numbers_N=self.numbers_N[atom_idx],
            positions_N3=self.positions_N3[atom_idx],
            forces_N3=self.forces_N3[atom_idx],
            cell_S33=self.cell_S33[indices],
            pbc_S3=self.pbc_S3[indices],
            energy_S=self.energy_S[indices],
            stress_S6=self.stress_S6[indices],
            natoms_S=self.natoms_S[indices],
        )

    @staticmethod
    def concatenate(parts: list["Frames"]) -> "Frames":
        return Frames(*(np.concatenate([getattr(p, f) for p in parts]) for f in Frames.__dataclass_fields__))
