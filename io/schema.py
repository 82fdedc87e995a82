"""The in-memory form of a labelled dataset: columnar arrays, one row per atom or per structure.

Shapes: S structures, N atoms in total (all structures concatenated).
Units: Å, eV, eV/Å, eV/Å³; stress in Voigt order xx, yy, zz, yz, xz, xy with ASE's sign
(stress = (1/V)·∂E/∂ε, positive under tension).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

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

    @staticmethod
    def empty() -> "Frames":
        """Zero structures with the right dtypes and trailing shapes (an empty shard is legal)."""
        f64 = np.float64
        return Frames(
            numbers_N=np.zeros(0, np.int64), positions_N3=np.zeros((0, 3), f64),
            forces_N3=np.zeros((0, 3), f64), cell_S33=np.zeros((0, 3, 3), f64),
            pbc_S3=np.zeros((0, 3), bool), energy_S=np.zeros(0, f64),
            stress_S6=np.zeros((0, 6), f64), natoms_S=np.zeros(0, np.int64),
        )

    def validate(self, path: object) -> None:
        """Raise DataError unless every column has the dtype and shape its name promises.

        Writers call this so a malformed Frames fails before any byte reaches disk.
        """
        n_structures, n_atoms = len(self.natoms_S), int(self.natoms_S.sum())
        expected = {
            "numbers_N": (np.int64, (n_atoms,)), "positions_N3": (np.float64, (n_atoms, 3)),
            "forces_N3": (np.float64, (n_atoms, 3)), "cell_S33": (np.float64, (n_structures, 3, 3)),
            "pbc_S3": (np.bool_, (n_structures, 3)), "energy_S": (np.float64, (n_structures,)),
            "stress_S6": (np.float64, (n_structures, 6)), "natoms_S": (np.int64, (n_structures,)),
        }
        for field, (dtype, shape) in expected.items():
            value = getattr(self, field)
            if value.dtype != dtype or value.shape != shape:
                raise DataError(path, f"dtype {value.dtype} shape {value.shape}, expected "
                                f"{np.dtype(dtype)} {shape}", field=field)
        if n_structures and self.natoms_S.min() < 1:
            frame = int(np.argmin(self.natoms_S))
            raise DataError(path, "structure has no atoms", frame=frame, field="natoms")

    @staticmethod
    def from_atoms(atoms_list: "Iterable[Any]", path: object = "<memory>") -> "Frames":
        """Columnar Frames from labelled ase.Atoms; frame k failing validation raises DataError(frame=k).

        Labels come from `atoms.calc.results` (what ASE readers and SinglePointCalculator fill),
        so nothing is ever recomputed here.
        """
        rows = [_frame_row(atoms, path, k) for k, atoms in enumerate(atoms_list)]
        if not rows:
            return Frames.empty()
        columns = {field: np.stack([row[field] for row in rows]) if field in _PER_STRUCTURE
                   else np.concatenate([row[field] for row in rows]) for field in rows[0]}
        return Frames(**columns)

    def to_atoms(self) -> list:
        """ase.Atoms with SinglePointCalculator labels (stress only where the row is not NaN)."""
        from ase import Atoms
        from ase.calculators.singlepoint import SinglePointCalculator

        out = []
        for s, (start, n) in enumerate(zip(self.offsets_S.tolist(), self.natoms_S.tolist())):
            atoms = Atoms(numbers=self.numbers_N[start:start + n], positions=self.positions_N3[start:start + n],
                          cell=self.cell_S33[s], pbc=self.pbc_S3[s])
            labels = {"energy": float(self.energy_S[s]), "forces": self.forces_N3[start:start + n].copy()}
            if not np.isnan(self.stress_S6[s]).any():
                labels["stress"] = self.stress_S6[s].copy()
            atoms.calc = SinglePointCalculator(atoms, **labels)
            out.append(atoms)
        return out


_PER_STRUCTURE = ("cell_S33", "pbc_S3", "energy_S", "stress_S6", "natoms_S")
MAX_ATOMIC_NUMBER = 118


def _finite(path: object, frame: int, field: str, value: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(value)):
        raise DataError(path, "non-finite value (nan or inf)", frame=frame, field=field)
    return value


def _label(atoms: Any, key: str) -> Any:
    """A label from the calculator results, else from info/arrays (where plain extxyz keys land)."""
    results = getattr(atoms.calc, "results", None) or {}
    if key in results:
        return results[key]
    return atoms.arrays.get(key) if key == "forces" else atoms.info.get(key)


def _voigt_stress(path: object, frame: int, stress: Any) -> np.ndarray:
    """Stress as Voigt-6 (xx, yy, zz, yz, xz, xy); a 3x3 matrix is accepted if symmetric."""
    try:
        stress = np.asarray(stress, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise DataError(path, f"not numeric: {err}", frame=frame, field="stress") from None
    if stress.shape == (3, 3):
        if not np.array_equal(stress, stress.T):
            raise DataError(path, "3x3 stress is not symmetric", frame=frame, field="stress")
        stress = stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
    if stress.shape != (6,):
        raise DataError(path, f"shape {stress.shape}, expected (6,) or (3, 3)", frame=frame, field="stress")
    return _finite(path, frame, "stress", stress)


def _frame_row(atoms: Any, path: object, frame: int) -> dict[str, np.ndarray]:
    """One structure's columns, validated; every error names the frame and the field."""
    n = len(atoms)
    if n == 0:
        raise DataError(path, "structure has no atoms", frame=frame, field="natoms")
    numbers = np.asarray(atoms.numbers, dtype=np.int64)
    bad = (numbers < 1) | (numbers > MAX_ATOMIC_NUMBER)
    if bad.any():
        raise DataError(path, f"atomic number {numbers[bad][0]} is not an element", frame=frame, field="species")
    energy, forces, stress = (_label(atoms, key) for key in ("energy", "forces", "stress"))
    if energy is None:
        raise DataError(path, "frame has no energy", frame=frame, field="energy")
    if forces is None:
        raise DataError(path, "frame has no forces", frame=frame, field="forces")
    try:
        energy = np.float64(energy)
        forces = np.asarray(forces, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise DataError(path, f"label is not numeric: {err}", frame=frame) from None
    if forces.shape != (n, 3):
        raise DataError(path, f"shape {forces.shape}, expected ({n}, 3)", frame=frame, field="forces")
    cell = _finite(path, frame, "cell", np.array(atoms.cell.array, dtype=np.float64))
    pbc = np.array(atoms.pbc, dtype=bool)
    if stress is None:
        stress = np.full(6, np.nan)
    else:
        stress = _voigt_stress(path, frame, stress)
        # Stress is (1/V)·∂E/∂ε: meaningless without a periodic cell that has a volume.
        if not pbc.any() or abs(np.linalg.det(cell)) < 1e-12:
            raise DataError(path, "stress given but the frame has no periodic cell", frame=frame, field="stress")
    return {
        "numbers_N": numbers,
        "positions_N3": _finite(path, frame, "positions", np.array(atoms.positions, dtype=np.float64)),
        "forces_N3": _finite(path, frame, "forces", forces),
        "cell_S33": cell,
        "pbc_S3": pbc,
        "energy_S": _finite(path, frame, "energy", np.atleast_1d(energy))[0],
        "stress_S6": stress,
        "natoms_S": np.int64(n),
    }
