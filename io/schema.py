"""The in-memory form of a labelled dataset: columnar arrays, one row per atom or per structure.

Shapes: S structures, N atoms in total (all structures concatenated).
Units: Å, eV, eV/Å, eV/Å³; stress in Voigt order xx, yy, zz, yz, xz, xy with ASE's sign
(stress = (1/V)·∂E/∂ε, positive under tension); charge in e, magnetic moments in μ_B.

Optional fields (charge, spin, magnetic moments) are None when the whole dataset lacks them, and
NaN for a structure that lacks them while others have them, as a NaN stress row means "no stress".
The on-disk form of all this is documented in io/SCHEMA.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from exaforce.io.neighbours import neighbour_pairs

SCHEMA_VERSION = 2  # 2: optional charge/spin/magmoms, method, force RMS (io/SCHEMA.md)
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
        self.path, self.frame, self.field, self.message = str(path), frame, field, message


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
    # Optional labels, keyword-only in practice: positional callers pass just the eight above.
    charge_S: np.ndarray | None = None   # float64 e, total charge
    spin_S: np.ndarray | None = None     # float64, spin multiplicity or total spin, as the source gives it
    magmoms_N: np.ndarray | None = None  # float64 μ_B, collinear per-atom magnetic moments

    @property
    def optional(self) -> tuple[str, ...]:
        """The optional fields this Frames carries, in OPTIONAL_FIELDS order."""
        return tuple(f for f in OPTIONAL_FIELDS if getattr(self, f) is not None)

    def columns(self) -> dict[str, np.ndarray]:
        """Every field that is present (required ones, then the optional ones carried)."""
        return {f: getattr(self, f) for f in (*REQUIRED_FIELDS, *self.optional)}

    def without_optional(self) -> "Frames":
        """The same structures with only the required fields (to combine datasets that differ in optionals)."""
        return Frames(**{f: getattr(self, f) for f in REQUIRED_FIELDS})

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
        return Frames(**{f: value[indices] if f in _PER_STRUCTURE else value[atom_idx]
                         for f, value in self.columns().items()})

    @staticmethod
    def concatenate(parts: list["Frames"], path: object = "<memory>") -> "Frames":
        """One Frames holding `parts` in order; they must carry the same optional fields.

        Why refuse rather than fill with NaN: a dataset without charges is not a dataset whose
        charges are unknown; the caller decides (e.g. `without_optional()` on every part).
        """
        if not parts:
            raise ValueError("Frames.concatenate: no parts")
        for k, part in enumerate(parts):
            if part.optional != parts[0].optional:
                raise DataError(path, f"cannot concatenate: part 0 has optional fields "
                                f"{list(parts[0].optional)}, part {k} has {list(part.optional)}")
        return Frames(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in parts[0].columns()})

    @staticmethod
    def empty(optional: Iterable[str] = ()) -> "Frames":
        """Zero structures with the right dtypes and trailing shapes (an empty shard is legal),
        carrying the `optional` fields so that it concatenates with its dataset's other shards."""
        unknown = sorted(set(optional) - set(OPTIONAL_FIELDS))
        if unknown:
            raise ValueError(f"unknown optional fields {unknown}; known: {list(OPTIONAL_FIELDS)}")
        return Frames(**{f: np.zeros((0, *shape), dtype) for f, (dtype, shape) in _TRAILING.items()
                         if f in REQUIRED_FIELDS or f in optional})

    def validate(self, path: object) -> None:
        """Raise DataError unless every column has the dtype and shape its name promises.

        Writers call this so a malformed Frames fails before any byte reaches disk.
        """
        n_structures, n_atoms = len(self.natoms_S), int(self.natoms_S.sum())
        for field, (dtype, trailing) in _TRAILING.items():
            value = getattr(self, field)
            if value is None and field in OPTIONAL_FIELDS:
                continue
            shape = ((n_structures if field in _PER_STRUCTURE else n_atoms), *trailing)
            if not isinstance(value, np.ndarray) or value.dtype != dtype or value.shape != shape:
                raise DataError(path, f"dtype {getattr(value, 'dtype', type(value).__name__)} shape "
                                f"{getattr(value, 'shape', None)}, expected "
                                f"{np.dtype(dtype)} {shape}", field=field)
        if n_structures and self.natoms_S.min() < 1:
            frame = int(np.argmin(self.natoms_S))
            raise DataError(path, "structure has no atoms", frame=frame, field="natoms")

    def check_finite(self, path: object) -> None:
        """Raise DataError naming the first structure with a NaN or inf coordinate or label.

        NaN means "not given" only as a whole stress row, a charge/spin value, or all magnetic
        moments of a structure; anything else non-finite would poison training silently.
        """
        for field, value in self.columns().items():
            if value.dtype.kind != "f":
                continue
            rows = value.reshape(len(value), -1)
            if field in _NAN_MEANS_ABSENT:
                nan_R = np.isnan(rows).any(axis=1)
                bad_R = np.isinf(rows).any(axis=1) | (nan_R & ~np.isnan(rows).all(axis=1))
                if field not in _PER_STRUCTURE and len(self.natoms_S):  # all of a structure's atoms or none
                    nan_S = np.add.reduceat(nan_R.astype(np.int64), self.offsets_S)
                    partial_S = (nan_S > 0) & (nan_S < self.natoms_S)
                    bad_R = bad_R | np.repeat(partial_S, self.natoms_S)
            else:
                bad_R = ~np.isfinite(rows).all(axis=1)
            if bad_R.any():
                row = int(np.flatnonzero(bad_R)[0])
                frame = row if field in _PER_STRUCTURE else int(np.searchsorted(self.offsets_S, row, "right") - 1)
                what = ("non-finite value (nan or inf)" if field not in _NAN_MEANS_ABSENT else
                        "inf, or nan in part of the values (nan means 'not given' only for all of them)")
                raise DataError(path, what, frame=frame, field=field.rsplit("_", 1)[0])

    @staticmethod
    def from_atoms(atoms_list: "Iterable[Any]", path: object = "<memory>", keys: "LabelKeys | None" = None) -> "Frames":
        """Columnar Frames from labelled ase.Atoms; frame k failing validation raises DataError(frame=k).

        Labels come from `atoms.calc.results` (what ASE readers and SinglePointCalculator fill), or
        atoms.info / atoms.arrays under `keys` (default: energy, forces, stress, else MACE's REF_*),
        so nothing is ever recomputed here.
        """
        rows = [_frame_row(atoms, path, k, keys or LabelKeys()) for k, atoms in enumerate(atoms_list)]
        if not rows:
            return Frames.empty()
        for field in OPTIONAL_FIELDS:  # given for some structures only: NaN ("not given") for the rest
            if any(field in row for row in rows):
                for row in rows:
                    row.setdefault(field, np.float64(np.nan) if field in _PER_STRUCTURE
                                   else np.full(len(row["numbers_N"]), np.nan))
        columns = {field: np.stack([row[field] for row in rows]) if field in _PER_STRUCTURE
                   else np.concatenate([row[field] for row in rows]) for field in rows[0]}
        return Frames(**columns)

    def to_atoms(self) -> list:
        """ase.Atoms with SinglePointCalculator labels (stress, magmoms only where not NaN);
        charge and spin go to atoms.info, where from_atoms looks for them."""
        from ase import Atoms
        from ase.calculators.singlepoint import SinglePointCalculator

        out = []
        for s, (start, n) in enumerate(zip(self.offsets_S.tolist(), self.natoms_S.tolist())):
            atoms = Atoms(numbers=self.numbers_N[start:start + n], positions=self.positions_N3[start:start + n],
                          cell=self.cell_S33[s], pbc=self.pbc_S3[s])
            labels = {"energy": float(self.energy_S[s]), "forces": self.forces_N3[start:start + n].copy()}
            if not np.isnan(self.stress_S6[s]).any():
                labels["stress"] = self.stress_S6[s].copy()
            if self.magmoms_N is not None and not np.isnan(self.magmoms_N[start:start + n]).any():
                labels["magmoms"] = self.magmoms_N[start:start + n].copy()
            for key, value_S in (("charge", self.charge_S), ("spin", self.spin_S)):
                if value_S is not None and not np.isnan(value_S[s]):
                    atoms.info[key] = float(value_S[s])
            atoms.calc = SinglePointCalculator(atoms, **labels)
            out.append(atoms)
        return out


REQUIRED_FIELDS = ("numbers_N", "positions_N3", "forces_N3", "cell_S33", "pbc_S3", "energy_S", "stress_S6",
                   "natoms_S")
OPTIONAL_FIELDS = ("charge_S", "spin_S", "magmoms_N")
_PER_STRUCTURE = ("cell_S33", "pbc_S3", "energy_S", "stress_S6", "natoms_S", "charge_S", "spin_S")
_NAN_MEANS_ABSENT = ("stress_S6", "charge_S", "spin_S", "magmoms_N")
# field -> (dtype, shape after the leading S or N)
_TRAILING = {
    "numbers_N": (np.int64, ()), "positions_N3": (np.float64, (3,)), "forces_N3": (np.float64, (3,)),
    "cell_S33": (np.float64, (3, 3)), "pbc_S3": (np.bool_, (3,)), "energy_S": (np.float64, ()),
    "stress_S6": (np.float64, (6,)), "natoms_S": (np.int64, ()), "charge_S": (np.float64, ()),
    "spin_S": (np.float64, ()), "magmoms_N": (np.float64, ()),
}
MAX_ATOMIC_NUMBER = 118
MIN_DISTANCE = 0.1     # Å: closer atoms (or an atom and its own periodic image) count as coincident
MIN_VOLUME = 1e-3      # Å³: a periodic cell with less has no volume (its matrix is singular)


def check_geometry(path: object, frame: int, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> None:
    """Raise DataError for a structure the model cannot evaluate: a cell periodic in some direction
    without volume (the stress divides by it; a slab, periodic in two directions, needs its vacuum
    vector), or coincident atoms (the energy is singular there and training turns NaN)."""
    if pbc.any() and abs(np.linalg.det(cell)) < MIN_VOLUME:
        hint = "" if pbc.all() else "; a slab or wire needs its cell vectors across the vacuum too"
        raise DataError(path, f"periodic cell without volume (|det| = {abs(np.linalg.det(cell)):.3g} Å³){hint}",
                        frame=frame, field="cell")
    shortest = _shortest_lattice_vector(cell, pbc) if pbc.any() else np.inf
    if shortest < MIN_DISTANCE:
        raise DataError(path, f"every atom is {shortest:.3g} Å from its own periodic image (closer than "
                        f"{MIN_DISTANCE} Å: a lattice vector is too short)", frame=frame, field="cell")
    closest = _closest_pair_within(positions, cell, pbc, MIN_DISTANCE)
    if closest is not None:
        i, j, distance = closest
        raise DataError(path, f"atoms {i} and {j} are {distance:.3g} Å apart (closer than {MIN_DISTANCE} Å: "
                        f"coincident)", frame=frame, field="positions")


_LATTICE_STEPS = np.array([n for n in np.ndindex(3, 3, 3) if n != (1, 1, 1)], dtype=np.float64) - 1.0


def _shortest_lattice_vector(cell: np.ndarray, pbc: np.ndarray) -> float:
    """The shortest of the lattice vectors with coefficients in {-1, 0, 1} along the periodic
    directions: the distance from an atom to its nearest own image in any cell that is not
    pathologically skewed."""
    steps = _LATTICE_STEPS[(_LATTICE_STEPS[:, ~pbc] == 0).all(axis=1)]
    return float(np.linalg.norm(steps @ cell, axis=1).min())


def _closest_pair_within(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray,
                         cutoff: float) -> tuple[int, int, float] | None:
    """(i, j, distance), i < j, of the closest two atoms closer than `cutoff` (an atom's own periodic
    image is _shortest_lattice_vector's); None if none. A cell list: O(N), milliseconds for 20,000 atoms."""
    i, j, distance = neighbour_pairs(positions, cell, pbc, cutoff, full_list=False, quantities="ijd")
    pair = i != j
    if not pair.any():
        return None
    k = int(np.argmin(np.where(pair, distance, np.inf)))
    return int(min(i[k], j[k])), int(max(i[k], j[k])), float(distance[k])


def _finite(path: object, frame: int, field: str, value: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(value)):
        raise DataError(path, "non-finite value (nan or inf)", frame=frame, field=field)
    return value


@dataclass(frozen=True)
class LabelKeys:
    """Under which names a frame's labels sit: in the calculator's results, in atoms.info (per
    structure) or atoms.arrays (per atom). `convert --energy-key/--forces-key/--stress-key`."""

    energy: str = "energy"
    forces: str = "forces"
    stress: str = "stress"

    def fallback(self, label: str) -> str | None:
        """MACE's names (REF_energy, REF_forces, REF_stress), tried when the default name is absent."""
        return f"REF_{label}" if getattr(self, label) == label else None


def _label(atoms: Any, key: str, per_atom: bool) -> Any:
    """A label from the calculator results, else from arrays (per atom) or info (per structure),
    where plain extxyz keys land."""
    results = getattr(atoms.calc, "results", None) or {}
    if key in results:
        return results[key]
    return atoms.arrays.get(key) if per_atom else atoms.info.get(key)


def _find_label(atoms: Any, keys: LabelKeys, label: str) -> Any:
    per_atom = label == "forces"
    value = _label(atoms, getattr(keys, label), per_atom)
    other = keys.fallback(label)
    return _label(atoms, other, per_atom) if value is None and other else value


def _missing(keys: LabelKeys, label: str) -> str:
    """'frame has no forces' with the names looked for and how to name another."""
    names = [getattr(keys, label)] + ([keys.fallback(label)] if keys.fallback(label) else [])
    return (f"frame has no {label} (looked for {' and '.join(repr(n) for n in names)} in the calculator "
            f"results, info and arrays; name another key with `convert --{label}-key`)")


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


def _frame_row(atoms: Any, path: object, frame: int, keys: LabelKeys = LabelKeys()) -> dict[str, np.ndarray]:
    """One structure's columns, validated; every error names the frame and the field."""
    n = len(atoms)
    if n == 0:
        raise DataError(path, "structure has no atoms", frame=frame, field="natoms")
    numbers = np.asarray(atoms.numbers, dtype=np.int64)
    bad = (numbers < 1) | (numbers > MAX_ATOMIC_NUMBER)
    if bad.any():
        raise DataError(path, f"atomic number {numbers[bad][0]} is not an element", frame=frame, field="species")
    energy, forces, stress = (_find_label(atoms, keys, label) for label in ("energy", "forces", "stress"))
    if energy is None:
        raise DataError(path, _missing(keys, "energy"), frame=frame, field="energy")
    if forces is None:
        raise DataError(path, _missing(keys, "forces"), frame=frame, field="forces")
    energy, forces = _numeric(path, frame, "energy", energy), _numeric(path, frame, "forces", forces)
    if energy.size != 1:
        raise DataError(path, f"shape {energy.shape}, expected a single number", frame=frame, field="energy")
    if forces.shape != (n, 3):
        raise DataError(path, f"shape {forces.shape}, expected ({n}, 3)", frame=frame, field="forces")
    cell = _finite(path, frame, "cell", np.array(atoms.cell.array, dtype=np.float64))
    pbc = np.array(atoms.pbc, dtype=bool)
    if stress is None:
        stress = np.full(6, np.nan)
    else:
        stress = _voigt_stress(path, frame, stress)
        # Stress is (1/V)·∂E/∂ε: meaningless without a periodic cell (a zero volume is check_geometry's).
        if not pbc.any():
            raise DataError(path, "stress given but the frame has no periodic cell", frame=frame, field="stress")
    positions = _finite(path, frame, "positions", np.array(atoms.positions, dtype=np.float64))
    check_geometry(path, frame, positions, cell, pbc)
    return {
        "numbers_N": numbers,
        "positions_N3": positions,
        "forces_N3": _finite(path, frame, "forces", forces),
        "cell_S33": cell,
        "pbc_S3": pbc,
        "energy_S": _finite(path, frame, "energy", np.atleast_1d(energy))[0],
        "stress_S6": stress,
        "natoms_S": np.int64(n),
        **_optional_labels(atoms, path, frame, n),
    }


def _optional_labels(atoms: Any, path: object, frame: int, n: int) -> dict[str, np.ndarray]:
    """Charge and spin from atoms.info, magnetic moments from the calculator's results, if given.

    Initial moments (atoms.get_initial_magnetic_moments) are a calculation's starting guess, not a
    label: ase.build.bulk seeds 0.6 μ_B on every Ni cell, so reading them would invent labels.
    """
    out: dict[str, np.ndarray] = {}
    for key in ("charge", "spin"):
        if atoms.info.get(key) is not None:
            value = _numeric(path, frame, key, atoms.info[key])
            if value.shape != ():
                raise DataError(path, f"shape {value.shape}, expected a single number", frame=frame, field=key)
            out[f"{key}_S"] = _finite(path, frame, key, value)[()]
    magmoms = (getattr(atoms.calc, "results", None) or {}).get("magmoms")
    if magmoms is not None:
        magmoms = _numeric(path, frame, "magmoms", magmoms)
        if magmoms.shape != (n,):
            raise DataError(path, f"shape {magmoms.shape}, expected ({n},) (collinear moments only)",
                            frame=frame, field="magmoms")
        out["magmoms_N"] = _finite(path, frame, "magmoms", magmoms)
    return out


def _numeric(path: object, frame: int, field: str, value: Any) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise DataError(path, f"not numeric: {err}", frame=frame, field=field) from None
