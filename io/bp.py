"""ADIOS2 BP5 datasets: one directory of global arrays per data source, read by hyperslab.

Layout (S structures, N atoms; structure s owns atoms offsets[s] : offsets[s] + natoms[s]):

    numbers [N] int64      positions [N,3] f64   forces [N,3] f64
    cell [S,3,3] f64       pbc [S,3] uint8       energy [S] f64     stress [S,6] f64 (NaN row: none)
    natoms [S] int64       offsets [S] int64
    optional (schema 2): charge [S] f64   spin [S] f64   magmoms [N] f64

The full schema (attributes, version history) is io/SCHEMA.md.

Why this layout: a contiguous range of structures is a contiguous range of atoms, so a rank
reads its shard with one selection per variable and never touches anyone else's bytes.
Why the temp-directory dance: a crashed conversion must never leave a dataset that opens.
Why a manifest of file sizes: ADIOS2 waits forever for bytes past the end of a truncated data
file, so a dataset cut short by a failed copy must be caught before ADIOS2 reads it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import TracebackType

import adios2
import numpy as np
from adios2 import bindings
from ase.data import chemical_symbols

from exaforce.io.atomic import check_free_space, fsync_tree, remove, replace_path, sibling
from exaforce.io.schema import SCHEMA_VERSION, VOIGT_ORDER, DataError, Frames
from exaforce.io.stats import STAT_KEYS, label_stats

ENGINE = "BP5"
UNITS = ("positions=Angstrom cell=Angstrom energy=eV forces=eV/Angstrom stress=eV/Angstrom^3 charge=e "
         "magmoms=mu_B")
UNITS_V1 = "positions=Angstrom cell=Angstrom energy=eV forces=eV/Angstrom stress=eV/Angstrom^3"
MANIFEST = "manifest.json"  # {"files": {name: bytes}} of the ADIOS2 files, written after they are closed
ADIOS_FILES = ("md.idx", "md.0", "mmd.0", "data.0")  # what every BP5 dataset has (checked when no manifest)
# variable -> (Frames field, ADIOS type, "atom" or "structure" rows, trailing shape)
VARIABLES = {
    "numbers": ("numbers_N", "int64_t", "atom", ()),
    "positions": ("positions_N3", "double", "atom", (3,)),
    "forces": ("forces_N3", "double", "atom", (3,)),
    "cell": ("cell_S33", "double", "structure", (3, 3)),
    "pbc": ("pbc_S3", "uint8_t", "structure", (3,)),
    "energy": ("energy_S", "double", "structure", ()),
    "stress": ("stress_S6", "double", "structure", (6,)),
    "natoms": ("natoms_S", "int64_t", "structure", ()),
    "offsets": (None, "int64_t", "structure", ()),
}
OPTIONAL_VARIABLES = {  # written when the Frames carries them (schema 2)
    "charge": ("charge_S", "double", "structure", ()),
    "spin": ("spin_S", "double", "structure", ()),
    "magmoms": ("magmoms_N", "double", "atom", ()),
}


def _all_variables() -> dict[str, tuple[str | None, str, str, tuple[int, ...]]]:
    """Required then optional variables, merged at call time (tests patch VARIABLES)."""
    return {**VARIABLES, **OPTIONAL_VARIABLES}


RESERVED_ATTRS = ("name", "method", "schema_version", "units", "voigt_order", "elements", "optional_fields",
                  "created_by", *STAT_KEYS)
Attr = str | int | float


# ---------------------------------------------------------------- writing


def write_bp(frames: Frames, path: str | os.PathLike, name: str,
             attrs: dict[str, Attr] | None = None, *, method: str = "unknown", overwrite: bool = False) -> None:
    """Write `frames` as a BP5 dataset directory at `path`, atomically; `method` is the fidelity label
    of its labels (e.g. "EMT", "PBE", "GFN2-xTB").

    The data goes to a sibling temp directory that is fsynced and renamed into place; any failure
    removes it. An existing `path` is refused unless `overwrite`, and then swapped out atomically.
    NaN/inf coordinates or labels are refused (DataError naming the structure) before any write.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{path}: dataset already exists (pass overwrite=True to replace it)")
        if not is_dataset(path):
            raise DataError(path, "exists and is not a BP5 dataset; refusing to replace it")
    frames.validate(path)
    frames.check_finite(path)
    if len(frames) == 0:
        raise DataError(path, "refusing to write a dataset with no structures")
    all_attrs = dataset_attrs(frames, name, attrs or {}, method=method)
    # ADIOS2 aborts the process on a full disk (a C++ exception in a destructor): check first.
    check_free_space(path, sum(column.nbytes for column in frames.columns().values()) + METADATA_BYTES)
    tmp = sibling(path, "tmp")
    try:
        _write_engine(frames, all_attrs, tmp)
        (tmp / PROFILE_FILE).unlink(missing_ok=True)
        _write_manifest(tmp)
        fsync_tree(tmp)
        replace_path(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def dataset_attrs(frames: Frames, name: str, extra: dict[str, Attr], *, method: str = "unknown") -> dict[str, Attr]:
    """Self-description stored with the data: provenance, units, conventions, summary statistics."""
    clash = sorted(set(extra) & set(RESERVED_ATTRS))
    if clash:
        raise ValueError(f"attrs {clash} are reserved by the dataset schema")
    bad = [k for k, v in extra.items() if not isinstance(v, (str, int, float)) or isinstance(v, bool)]
    if bad:
        raise TypeError(f"attrs {bad}: values must be str, int or float")
    if not isinstance(method, str) or not method.strip():
        raise ValueError(f"method = {method!r}: must be a non-empty fidelity label, e.g. 'EMT' or 'PBE'")
    elements = sorted(set(frames.numbers_N.tolist()))
    optional = [var for var, (field, *_) in OPTIONAL_VARIABLES.items() if getattr(frames, field) is not None]
    return {
        "name": name,
        "method": method,
        "schema_version": SCHEMA_VERSION,
        "units": UNITS,
        "voigt_order": " ".join(VOIGT_ORDER),
        "elements": " ".join(chemical_symbols[z] for z in elements),
        "optional_fields": " ".join(optional),
        **label_stats(frames),
        "created_by": "exaforce",
        **extra,
    }


def _columns(frames: Frames) -> dict[str, np.ndarray]:
    """The arrays as stored: contiguous, fixed dtypes, pbc as uint8 (ADIOS has no bool)."""
    out = {}
    for var, (field, _, _, _) in _all_variables().items():
        value = frames.offsets_S if field is None else getattr(frames, field)
        if value is not None:
            out[var] = np.ascontiguousarray(value.astype(np.uint8) if var == "pbc" else value)
    return out


# ADIOS2 2.12's BP5 engine writes a profile whatever its "Profile" parameter says: the writer into
# the dataset (PROFILE_FILE, removed before publication: not data), the reader at close into
# /tmp/<dataset name>_<pid in hex>_profiling.json (removed after close: this process's own file).
PROFILE_FILE = "profiling.json"
METADATA_BYTES = 1 << 20  # room for a dataset's ADIOS2 metadata and manifest (a few KB to hundreds)


def _reader_profile(path: Path) -> Path:
    return Path("/tmp") / f"{Path(path).name}_{os.getpid():x}_profiling.json"


def is_dataset(path: Path) -> bool:
    """A BP5 dataset folder (what `overwrite` may replace; never a user's other files). Not a link:
    replacing one would remove the link, not what it points to."""
    path = Path(path)
    return path.is_dir() and not path.is_symlink() and (path / "md.idx").is_file()


def _write_manifest(directory: Path) -> None:
    """Record every ADIOS2 file's size, so that open_bp can refuse a truncated copy before ADIOS2 hangs on it."""
    sizes = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and _is_adios_file(p.name)}
    (directory / MANIFEST).write_text(json.dumps({"files": sizes}, indent=1) + "\n")


def _is_adios_file(name: str) -> bool:
    return name == "md.idx" or name.split(".")[0] in ("md", "mmd", "data")


def _write_engine(frames: Frames, attrs: dict[str, Attr], directory: Path) -> None:
    """One BP5 step holding every variable as a single global block, plus the attributes."""
    adios = adios2.Adios()
    io = adios.declare_io("exaforce.write")
    io.set_engine(ENGINE)
    engine = io.open(str(directory), bindings.Mode.Write)
    try:
        engine.begin_step()
        for var, data in _columns(frames).items():
            _put(io, engine, var, data)
        for key, value in attrs.items():
            io.define_attribute(key, value)
        engine.end_step()
    finally:
        engine.close()


def _put(io: adios2.IO, engine: adios2.Engine, var: str, data: np.ndarray) -> None:
    shape = list(data.shape)
    variable = io.define_variable(var, data, shape, [0] * len(shape), shape)
    engine.put(variable, data, bindings.Mode.Sync)


# ---------------------------------------------------------------- reading


def open_bp(path: str | os.PathLike) -> BPDataset:
    """Open and validate a dataset written by write_bp (see BPDataset)."""
    return BPDataset(Path(path))


class BPDataset:
    """A validated, open BP5 dataset; `.read(start, count)` returns a contiguous range of structures.

    Opening reads only metadata plus natoms/offsets (8 bytes per structure each), so every rank
    can open the same dataset cheaply and then read just its own shard.
    """

    def __init__(self, path: Path):
        self.path = path
        if not path.exists():
            raise DataError(path, "no such dataset")
        self._has_manifest = _check_files(path)  # before ADIOS2 sees a truncated file (it would hang)
        self._adios = adios2.Adios()
        self._io = self._adios.declare_io("exaforce.read")
        self._io.set_engine(ENGINE)
        try:
            self._engine = self._io.open(str(path), bindings.Mode.ReadRandomAccess)
        except Exception as err:  # noqa: BLE001 — ADIOS2 raises RuntimeError with a long log
            raise DataError(path, f"not a readable ADIOS2 {ENGINE} dataset: {_adios_message(err)}") from None
        try:
            self.attrs = self._read_attrs()
            self._check_schema_version()
            self.n_structures, self.n_atoms = self._check_variables()
            self._check_data_size()
            self.natoms_S = self._get("natoms", 0, self.n_structures)
            self._offsets_S = self._get("offsets", 0, self.n_structures)
            self._check_offsets()
        except BaseException:
            self.close()
            raise
        self.name = str(self.attrs.get("name", path.name))
        self.method = str(self.attrs.get("method", "unknown"))  # schema 1 had no method

    # -- validation on open

    def _read_attrs(self) -> dict[str, Attr]:
        attrs: dict[str, Attr] = {}
        for key in self._io.available_attributes():
            attribute = self._io.inquire_attribute(key)
            if attribute.type() == "string":
                attrs[key] = attribute.data_string()
            else:
                attrs[key] = attribute.data().item()
        return attrs

    def _check_schema_version(self) -> None:
        version = self.attrs.get("schema_version")
        if not isinstance(version, int):
            raise DataError(self.path, "missing or non-integer attribute", field="schema_version")
        if version > SCHEMA_VERSION:
            raise DataError(self.path, f"schema_version {version} is newer than this exaforce supports "
                            f"({SCHEMA_VERSION}); upgrade exaforce", field="schema_version")
        if version < 1:
            raise DataError(self.path, f"schema_version {version} is not a version of this schema "
                            f"(1 .. {SCHEMA_VERSION})", field="schema_version")
        if version >= 2 and not self._has_manifest:
            raise DataError(self.path, f"missing {MANIFEST} (incomplete copy?)", field=MANIFEST)
        self.schema_version = version

    def _check_variables(self) -> tuple[int, int]:
        """Every required variable exists with the right type and a shape consistent with S and N;
        so does every optional one present, whose Frames fields become `self.optional`."""
        sizes, optional = {}, []
        for var, (field, adios_type, rows, trailing) in _all_variables().items():
            variable = self._io.inquire_variable(var)
            if variable is None and var in OPTIONAL_VARIABLES:
                continue
            if variable is None:
                raise DataError(self.path, "missing variable", field=var)
            if var in OPTIONAL_VARIABLES:
                optional.append(field)
            if variable.type() != adios_type:
                raise DataError(self.path, f"type {variable.type()}, expected {adios_type}", field=var)
            shape = tuple(variable.shape())
            if shape[1:] != trailing or len(shape) != 1 + len(trailing):
                raise DataError(self.path, f"shape {list(shape)}, expected [{rows}s, "
                                f"{', '.join(map(str, trailing))}]", field=var)
            if sizes.setdefault(rows, shape[0]) != shape[0]:
                raise DataError(self.path, f"{shape[0]} rows, other {rows} variables have {sizes[rows]}",
                                field=var)
        self.optional = tuple(optional)
        return sizes["structure"], sizes["atom"]

    def _check_data_size(self) -> None:
        """The data files must hold at least every variable's bytes (catches truncation without a manifest)."""
        payload = sum(int(np.prod(self._io.inquire_variable(var).shape())) *
                      np.dtype(adios2.type_adios_to_numpy(spec[1])).itemsize
                      for var, spec in _all_variables().items()
                      if self._io.inquire_variable(var) is not None)
        on_disk = sum(p.stat().st_size for p in self.path.glob("data.*"))
        if on_disk < payload:
            raise DataError(self.path, f"data files hold {on_disk} bytes, the variables need {payload}: "
                            "truncated dataset", field="data")

    def _check_offsets(self) -> None:
        expected = np.concatenate([[0], np.cumsum(self.natoms_S)[:-1]])
        if self.natoms_S.sum() != self.n_atoms or not np.array_equal(self._offsets_S, expected):
            raise DataError(self.path, "offsets/natoms do not tile the atom arrays", field="offsets")

    # -- reading

    def read(self, start: int, count: int) -> Frames:
        """Structures start .. start+count-1, reading only their hyperslab of every variable."""
        if start < 0 or count < 0 or start + count > self.n_structures:
            raise IndexError(f"{self.path}: structures [{start}, {start + count}) outside "
                             f"[0, {self.n_structures})")
        if count == 0:
            return Frames.empty(self.optional)
        natoms = self.natoms_S[start:start + count]
        atom_start, atom_count = int(self._offsets_S[start]), int(natoms.sum())
        arrays = {}
        for var, (field, _, rows, _) in _all_variables().items():
            if field is None or var == "natoms" or (var in OPTIONAL_VARIABLES and field not in self.optional):
                continue
            row0, nrows = (atom_start, atom_count) if rows == "atom" else (start, count)
            arrays[field] = self._get(var, row0, nrows)
        arrays["pbc_S3"] = arrays["pbc_S3"].astype(bool)
        return Frames(natoms_S=natoms.copy(), **arrays)

    def _get(self, var: str, row0: int, nrows: int) -> np.ndarray:
        """Rows row0 .. row0+nrows-1 of one variable: one selection, one read."""
        _, adios_type, _, trailing = _all_variables()[var]
        variable = self._io.inquire_variable(var)
        variable.set_selection([[row0] + [0] * len(trailing), [nrows, *trailing]])
        out = np.empty((nrows, *trailing), dtype=adios2.type_adios_to_numpy(adios_type))
        self._engine.get(variable, out, bindings.Mode.Sync)
        return out

    # -- lifetime

    def close(self) -> None:
        engine, self._engine = getattr(self, "_engine", None), None
        if engine is not None:
            engine.close()
            _reader_profile(self.path).unlink(missing_ok=True)

    def __enter__(self) -> BPDataset:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __len__(self) -> int:
        return self.n_structures

    def __repr__(self) -> str:
        return (f"BPDataset({str(self.path)!r}, name={self.name!r}, method={self.method!r}, "
                f"structures={self.n_structures}, atoms={self.n_atoms})")


def _adios_message(err: Exception) -> str:
    """ADIOS2's exception text without its colour codes, timestamps and tags: what it says went wrong."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).splitlines()[0] if str(err) else type(err).__name__
    text = re.sub(r"\[[^]]*\]\s*", "", text)            # [date] [ADIOS2 EXCEPTION]
    text = re.sub(r"<[^>]*>\s*", "", text).lstrip(": ")  # <Engine> <BP5Reader> <OpenFiles> :
    return text[:300]


def _check_files(path: Path) -> bool:
    """Every file the manifest lists exists with its recorded size (True), or, for a dataset without
    a manifest (schema 1), the files every BP5 dataset has exist (False)."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        missing = [name for name in ADIOS_FILES if not (path / name).is_file()]
        if len(missing) == len(ADIOS_FILES):
            what = "a folder" if path.is_dir() else "a file"
            raise DataError(path, f"not a BP5 dataset ({what} without its md.idx, md.0, mmd.0, data.0; "
                            f"`exaforce data convert` makes one)")
        if missing:
            raise DataError(path, f"missing file {missing[0]}: incomplete or damaged dataset", field=missing[0])
        return False
    try:
        sizes = json.loads(manifest.read_text())["files"]
        sizes = {str(name): int(size) for name, size in sizes.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(path, f"unreadable manifest: {err}", field=MANIFEST) from None
    for name, size in sizes.items():
        item = path / name
        if not item.is_file():
            raise DataError(path, f"missing file {name}: incomplete or damaged dataset", field=name)
        if item.stat().st_size != size:
            raise DataError(path, f"file {name} has {item.stat().st_size} bytes, the manifest says {size}: "
                            "truncated or damaged dataset", field=name)
    return True
