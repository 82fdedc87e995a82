"""HDF5 in and out, in the layout of io/SCHEMA.md: the BP5 variables as root datasets of one file.

Why the same names and shapes as the BP5 dataset: producers (DFT workflows, other codes) can
write it with a dozen lines of h5py, and conversion is a copy plus checks, never a guess.
Every check names the file and the dataset (field) or structure (frame) at fault.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from exaforce.io.atomic import remove, replace_path, sibling
from exaforce.io.bp import OPTIONAL_VARIABLES, UNITS, VARIABLES
from exaforce.io.schema import SCHEMA_VERSION, DataError, Frames

DTYPES = {"int64_t": np.int64, "double": np.float64, "uint8_t": np.uint8}
LAYOUT = {**VARIABLES, **OPTIONAL_VARIABLES}  # dataset name -> (Frames field, type, rows, trailing shape)


# ---------------------------------------------------------------- writing


def write_hdf5(frames: Frames, path: str | os.PathLike, name: str, method: str = "unknown") -> None:
    """Write `frames` in the documented layout (for tests, benchmarks and producers); atomic like write_bp."""
    path = Path(path)
    frames.validate(path)
    tmp = sibling(path, "tmp")
    try:
        with h5py.File(tmp, "w") as fh:
            for var, (field, adios_type, _, _) in LAYOUT.items():
                value = frames.offsets_S if field is None else getattr(frames, field)
                if value is not None:
                    fh.create_dataset(var, data=np.asarray(value, dtype=DTYPES[adios_type]))
            fh.attrs.update({"name": name, "method": method, "schema_version": SCHEMA_VERSION, "units": UNITS})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        replace_path(tmp, path)
    except BaseException:
        remove(tmp)
        raise


# ---------------------------------------------------------------- reading


def read_hdf5(path: str | os.PathLike) -> tuple[Frames, dict[str, str]]:
    """All structures of an HDF5 file, checked, and its metadata ({"name", "method"} where given)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such file" if not path.exists() else "not a regular file")
    try:
        fh = h5py.File(path, "r")
    except OSError as err:
        raise DataError(path, f"not a readable HDF5 file: {err}") from None
    with fh:
        meta = _check_attrs(path, dict(fh.attrs))
        columns = {var: _dataset(path, fh, var) for var in LAYOUT
                   if var in VARIABLES or var in fh}
    _check_rows(path, columns)
    frames = Frames(**{field: columns[var] for var, (field, *_) in LAYOUT.items()
                       if field is not None and var in columns})
    frames.validate(path)
    frames.check_finite(path)
    return frames, meta


def _check_attrs(path: Path, attrs: dict[str, Any]) -> dict[str, str]:
    """schema_version known, units ours (no silent unit conversion); name and method passed on."""
    attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
    version = attrs.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, (int, np.integer)) or not 1 <= version <= SCHEMA_VERSION:
        raise DataError(path, f"schema_version {version!r}: this exaforce reads 1 .. {SCHEMA_VERSION}",
                        field="schema_version")
    if "units" in attrs:
        ours = dict(item.split("=", 1) for item in UNITS.split())
        try:
            theirs = dict(item.split("=", 1) for item in str(attrs["units"]).split())
        except ValueError:
            raise DataError(path, f"units {attrs['units']!r}: expected key=unit pairs", field="units") from None
        wrong = {k: v for k, v in theirs.items() if ours.get(k) != v}
        if wrong:
            raise DataError(path, f"units {wrong} differ from exaforce's {ours}; convert the data first",
                            field="units")
    return {key: str(attrs[key]) for key in ("name", "method") if key in attrs}


def _dataset(path: Path, fh: h5py.File, var: str) -> np.ndarray:
    """One root dataset as the dtype and trailing shape the schema promises (safe casts only)."""
    _, adios_type, rows, trailing = LAYOUT[var]
    if var not in fh:
        raise DataError(path, "missing dataset", field=var)
    if not isinstance(fh[var], h5py.Dataset):
        raise DataError(path, "is a group, expected a dataset", field=var)
    value = fh[var][()]
    dtype = np.dtype(DTYPES[adios_type])
    if var == "pbc" and value.dtype == np.bool_:
        value = value.astype(np.uint8)
    if not isinstance(value, np.ndarray) or not np.can_cast(value.dtype, dtype, "safe"):
        raise DataError(path, f"dtype {getattr(value, 'dtype', type(value).__name__)}, expected {dtype}", field=var)
    if value.ndim != 1 + len(trailing) or value.shape[1:] != trailing:
        raise DataError(path, f"shape {value.shape}, expected ({rows}s{''.join(f', {t}' for t in trailing)})",
                        field=var)
    if var == "pbc":
        if not np.isin(value, (0, 1)).all():
            raise DataError(path, "values other than 0 and 1", field=var)
        return value.astype(bool)
    return value.astype(dtype, copy=False)


def _check_rows(path: Path, columns: dict[str, np.ndarray]) -> None:
    """Per-atom datasets have one row per atom, per-structure ones one per structure; offsets tile them."""
    counts = {"atom": ("numbers", len(columns["numbers"])), "structure": ("natoms", len(columns["natoms"]))}
    for var, value in columns.items():
        reference, expected = counts[LAYOUT[var][2]]
        if len(value) != expected:
            raise DataError(path, f"{len(value)} rows, expected {expected} (one per "
                            f"{'atom' if reference == 'numbers' else 'structure'}, as {reference})", field=var)
    natoms = columns["natoms"]
    if (natoms < 1).any():
        raise DataError(path, "structure has no atoms", frame=int(np.flatnonzero(natoms < 1)[0]), field="natoms")
    if natoms.sum() != len(columns["numbers"]):
        raise DataError(path, f"natoms sum to {natoms.sum()}, numbers has {len(columns['numbers'])} rows",
                        field="natoms")
    expected_offsets = np.concatenate([[0], np.cumsum(natoms)[:-1]])
    if not np.array_equal(columns["offsets"], expected_offsets):
        frame = int(np.flatnonzero(columns["offsets"] != expected_offsets)[0])
        raise DataError(path, "offsets are not the running sum of natoms", frame=frame, field="offsets")
