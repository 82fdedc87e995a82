"""ASE databases in — SQLite `.db` files and fairchem's LMDB `.aselmdb` files (the ase-db-backends
package) —: one structure per row, in row-id order.

Labels come from each row's stored calculator results (energy, forces, stress, magmoms), the
total charge from a `charge` key-value pair or else the sum of the row's initial charges, the
spin from a `spin` key-value pair. Errors name the file, the structure (its position in the
file) and the row id, so the bad row can be found with `ase db FILE id=K`.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ase.db
import numpy as np
from ase import Atoms

from exaforce.io.schema import DataError, Frames, LabelKeys


def read_asedb(path: str | os.PathLike, keys: LabelKeys | None = None,
               progress: Callable[[int, int], None] = lambda done, total: None,
               backend: str = "db") -> tuple[Frames, dict[str, str]]:
    """All rows of an ASE database (`backend` "db": SQLite; "aselmdb": LMDB) as checked Frames, and
    {"method"} when its metadata names one. `keys`: labels stored under other names, as key-value
    pairs or in row.data (e.g. MACE's REF_*); `progress` hears of every row read (done, total)."""
    path = Path(path)
    # connect() would silently create a new, empty database at a mistyped path.
    if not path.is_file():
        raise DataError(path, "no such file" if not path.exists() else "not a regular file")
    errors: tuple[type[BaseException], ...] = (sqlite3.Error, ValueError, KeyError)
    try:
        if backend == "aselmdb":
            errors += _check_lmdb(path)
            db = ase.db.connect(path, type="aselmdb", readonly=True)  # read-only: no write lock
        else:
            db = ase.db.connect(path, type="db", create_indices=False, use_lock_file=False)
        # Under mpiexec ASE would read on its rank 0 and broadcast to all ranks of its world: a
        # collective that deadlocks when each rank converts a different file.
        db.serial = True
        total = db.count()
        atoms_list, row_ids = [], []
        for row in db.select():
            atoms_list.append(_atoms(row, keys or LabelKeys()))
            row_ids.append(row.id)
            progress(len(atoms_list), total)
        metadata = db.metadata
        if backend == "aselmdb":
            db.close()  # its memory map (SQLite closes per query)
    except errors as err:
        raise DataError(path, f"not a readable ASE database: {type(err).__name__}: {err}") from None
    if not atoms_list:
        raise DataError(path, "database has no rows")
    try:
        frames = Frames.from_atoms(atoms_list, path, keys)
    except DataError as err:
        if err.frame is None:
            raise
        raise DataError(path, f"{err.message} (ase.db row id {row_ids[err.frame]})", frame=err.frame,
                        field=err.field) from None
    method = metadata.get("method") if isinstance(metadata, dict) else None
    return frames, ({"method": str(method)} if method else {})


def _check_lmdb(path: Path) -> tuple[type[BaseException], ...]:
    """Opens the file as LMDB once before ASE does (whose backend, failing to open, also fails in its
    destructor with a traceback on stderr); returns the LMDB error types."""
    try:
        import ase_db_backends.aselmdb  # noqa: F401
        import lmdb
    except ModuleNotFoundError as err:
        raise DataError(path, f"reading .aselmdb files needs the ase-db-backends and lmdb packages ({err}; "
                              f"both are pinned in envs/local/)") from None
    try:
        lmdb.open(str(path), subdir=False, readonly=True, lock=False).close()
    except lmdb.Error as err:
        raise DataError(path, f"not a readable ASE database: {type(err).__name__}: {err}") from None
    return (lmdb.Error,)


def _atoms(row: Any, keys: LabelKeys) -> Atoms:
    """The row as Atoms with its results; charge and spin in info, where Frames.from_atoms looks;
    labels under other names (`keys`, MACE's REF_*) from key-value pairs or row.data into info and
    arrays, where Frames.from_atoms looks for them too."""
    atoms = row.toatoms()
    atoms.info = {}
    data = row.get("data") or {}
    for label in ("energy", "forces", "stress"):
        for name in {getattr(keys, label), keys.fallback(label)} - {None, label}:
            value = row.key_value_pairs.get(name, data.get(name))
            if value is not None:
                (atoms.arrays if label == "forces" else atoms.info)[name] = np.asarray(value, dtype=np.float64)
    # A `charge` key-value pair is shadowed by AtomsRow.charge (the sum of initial charges): read it directly.
    pairs = row.key_value_pairs
    if "charge" in pairs:
        atoms.info["charge"] = row.__dict__["charge"]
    elif row.get("initial_charges") is not None:
        atoms.info["charge"] = float(row.initial_charges.sum())
    if "spin" in pairs:
        atoms.info["spin"] = pairs["spin"]
    return atoms
