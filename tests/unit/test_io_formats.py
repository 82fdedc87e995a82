"""Versioned dataset format: optional fields, converters (extxyz, ASE db, HDF5) round-tripping exactly
through BP5, schema versions, `data inspect`, and every kind of bad data named by file and sample."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import ase
import ase.db
import h5py
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from conftest import run_cli
from exaforce.io import bp
from exaforce.io.bp import open_bp, write_bp
from exaforce.io.convert import convert, convert_file
from exaforce.io.extxyz import write_extxyz
from exaforce.io.hdf5 import read_hdf5, write_hdf5
from exaforce.io.schema import OPTIONAL_FIELDS, DataError, Frames
from exaforce.io.summary import summarize
from exaforce.io.synth import synthesize

pytestmark = pytest.mark.data


# ---------------------------------------------------------------- data


def clusters(n: int, seed: int) -> list:
    """Non-periodic Cu/Au clusters (no cell, no stress) with EMT energy and forces."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((1, 1, 1 + k % 2))
        atoms.symbols = [str(s) for s in rng.choice(["Cu", "Au"], size=len(atoms))]
        atoms.positions += rng.normal(0.0, 0.05, size=atoms.positions.shape)
        atoms.set_cell(np.zeros((3, 3)))
        atoms.pbc = False
        atoms.calc = EMT()
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
        out.append(atoms)
    return out


def labelled(seed: int = 3, optional: bool = True) -> Frames:
    """Periodic EMT cells with stress and non-periodic clusters without; with `optional`, charge, spin
    and magnetic moments, each missing ("not given", NaN) for one structure."""
    frames = Frames.from_atoms(synthesize(6, seed) + clusters(3, seed))
    if optional:
        rng = np.random.default_rng(seed)
        frames.charge_S = rng.integers(-2, 3, len(frames)).astype(np.float64)
        frames.charge_S[1] = np.nan
        frames.spin_S = rng.integers(1, 4, len(frames)).astype(np.float64)
        frames.spin_S[7] = np.nan
        frames.magmoms_N = rng.normal(0.0, 1.0, frames.n_atoms)
        start, n = int(frames.offsets_S[2]), int(frames.natoms_S[2])
        frames.magmoms_N[start:start + n] = np.nan
    return frames


def assert_equal(a: Frames, b: Frames) -> None:
    """Bit-equal, NaN rows included, and the same optional fields."""
    assert a.optional == b.optional
    for field, x in a.columns().items():
        y = getattr(b, field)
        assert (x.dtype, x.shape) == (y.dtype, y.shape), field
        assert np.array_equal(x, y, equal_nan=True), field


def read_all(path: Path) -> Frames:
    with open_bp(path) as ds:
        return ds.read(0, len(ds))


def write_db(frames: Frames, path: Path) -> None:
    """An ASE database as a producer writes one: results on the calculator, charge/spin as key-value pairs
    (SQLite, or fairchem's LMDB backend for a .aselmdb path)."""
    with ase.db.connect(path, type="aselmdb" if path.suffix == ".aselmdb" else "db") as db:
        for atoms in frames.to_atoms():
            pairs = {key: atoms.info.pop(key) for key in ("charge", "spin") if key in atoms.info}
            db.write(atoms, **pairs)


def h5_edit(path: Path, edit) -> None:
    with h5py.File(path, "r+") as fh:
        edit(fh)


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ---------------------------------------------------------------- Frames with optional fields


def test_positional_construction_keeps_working():
    f = labelled(optional=False)
    g = Frames(f.numbers_N, f.positions_N3, f.forces_N3, f.cell_S33, f.pbc_S3, f.energy_S, f.stress_S6, f.natoms_S)
    assert g.optional == () and (g.charge_S, g.spin_S, g.magmoms_N) == (None, None, None)
    g.validate("<test>")


def test_optional_fields_survive_atoms_select_concatenate():
    frames = labelled()
    assert frames.optional == OPTIONAL_FIELDS
    frames.validate("<test>")
    frames.check_finite("<test>")
    assert_equal(Frames.from_atoms(frames.to_atoms()), frames)
    picked = frames.select(np.array([8, 2, 5]))
    assert picked.magmoms_N.shape == (picked.n_atoms,) and np.isnan(picked.charge_S).sum() == 0
    assert_equal(Frames.concatenate([frames.select(np.arange(4)), frames.select(np.arange(4, 9))]), frames)
    assert_equal(Frames.concatenate([frames.select(np.arange(0)), frames]), frames)
    assert Frames.empty(frames.optional).optional == frames.optional


def test_concatenate_refuses_parts_with_different_optional_fields():
    frames = labelled()
    with pytest.raises(DataError, match=r"part 0 has optional fields \['charge_S', 'spin_S', 'magmoms_N'\], "
                                        r"part 1 has \[\]"):
        Frames.concatenate([frames, frames.without_optional()])


def test_from_atoms_reads_info_and_calculated_magmoms_not_initial_ones():
    atoms = synthesize(2, seed=4)
    atoms[0].info.update(charge=-1, spin=2)
    atoms[0].calc.results["magmoms"] = np.arange(len(atoms[0]), dtype=float)
    atoms[1].set_initial_magnetic_moments(np.ones(len(atoms[1])))  # a starting guess, not a label
    frames = Frames.from_atoms(atoms)
    assert np.array_equal(frames.charge_S, [-1.0, np.nan], equal_nan=True)
    assert np.array_equal(frames.spin_S, [2.0, np.nan], equal_nan=True)
    assert np.array_equal(frames.magmoms_N[:len(atoms[0])], np.arange(len(atoms[0])))
    assert np.isnan(frames.magmoms_N[len(atoms[0]):]).all()


@pytest.mark.parametrize("field,edit,frame", [
    ("stress", lambda f: f.stress_S6.__setitem__((4, 2), np.nan), 4),  # part of a row: not "no stress"
    ("magmoms", lambda f: f.magmoms_N.__setitem__(int(f.offsets_S[5]) + 1, np.nan), 5),
    ("charge", lambda f: f.charge_S.__setitem__(3, np.inf), 3),
    ("forces", lambda f: f.forces_N3.__setitem__((int(f.offsets_S[6]), 0), np.nan), 6),
])
def test_check_finite_names_structure_and_field(field, edit, frame):
    frames = labelled()
    edit(frames)
    with pytest.raises(DataError) as info:
        frames.check_finite("x.bp")
    assert (info.value.field, info.value.frame) == (field, frame)


# ---------------------------------------------------------------- converters: exact round trips


def test_extxyz_round_trip(tmp_path):
    frames = labelled()
    write_extxyz(frames, tmp_path / "in.extxyz")
    done = convert_file(tmp_path / "in.extxyz", tmp_path / "out.bp", "xyz-set", "EMT")
    assert (done.n_structures, done.method) == (len(frames), "EMT")
    assert_equal(read_all(tmp_path / "out.bp"), frames)
    with open_bp(tmp_path / "out.bp") as ds:
        assert (ds.name, ds.method, ds.schema_version, ds.optional) == ("xyz-set", "EMT", 2, OPTIONAL_FIELDS)
        assert ds.attrs["optional_fields"] == "charge spin magmoms"


def test_asedb_round_trip(tmp_path):
    frames = labelled()
    write_db(frames, tmp_path / "in.db")
    convert_file(tmp_path / "in.db", tmp_path / "out.bp", "db-set", "PBE")
    assert_equal(read_all(tmp_path / "out.bp"), frames)
    with open_bp(tmp_path / "out.bp") as ds:
        assert (ds.name, ds.method, ds.attrs["source"]) == ("db-set", "PBE", str(tmp_path / "in.db"))


def test_aselmdb_round_trip_equals_the_sqlite_database(tmp_path):
    """fairchem's ASE LMDB files (ase-db-backends) convert like SQLite databases: the same frames."""
    frames = labelled()
    write_db(frames, tmp_path / "in.aselmdb")
    proc = run_cli(["data", "convert", str(tmp_path / "in.aselmdb"), "--out", str(tmp_path / "out.bp"),
                    "--name", "omat", "--method", "PBE"])
    assert proc.returncode == 0, proc.stderr
    assert_equal(read_all(tmp_path / "out.bp"), frames)


def test_convert_file_that_is_not_an_lmdb_database(tmp_path):
    (tmp_path / "junk.aselmdb").write_bytes(b"not lmdb\n" * 1000)
    proc = run_cli(["data", "convert", str(tmp_path / "junk.aselmdb"), "--out", str(tmp_path / "out.bp"),
                    "--name", "x"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"exaforce: error: {tmp_path / 'junk.aselmdb'}: not a readable ASE database"), \
        proc.stderr
    assert entries(tmp_path) == ["junk.aselmdb"]


@pytest.mark.parametrize("suffix", [".xyz", ".db", ".aselmdb"])
def test_reading_reports_progress_per_structure(tmp_path, suffix):
    frames = labelled(optional=False)
    source = tmp_path / f"in{suffix}"
    write_extxyz(frames, source) if suffix == ".xyz" else write_db(frames, source)
    calls = []
    convert_file(source, tmp_path / "out.bp", "x", None, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(k + 1, len(frames)) for k in range(len(frames))]


@pytest.mark.skipif(shutil.which("script") is None, reason="needs util-linux `script` for a pseudo-terminal")
def test_convert_shows_a_progress_bar_on_a_terminal(tmp_path):
    """On a terminal (a pseudo-terminal from `script`, given a width: tqdm draws nothing at 0 columns)
    `data convert` draws a tqdm bar while it reads."""
    import subprocess
    import sys

    frames = labelled(optional=False)
    write_extxyz(frames, tmp_path / "in.xyz")
    command = (f"stty cols 120 rows 40; {sys.executable} -m exaforce.cli data convert {tmp_path / 'in.xyz'} --out {tmp_path / 'out.bp'} "
               f"--name x")
    proc = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert f"reading in.xyz: 100%" in proc.stdout and f"{len(frames)}/{len(frames)}" in proc.stdout, proc.stdout


def test_asedb_without_optional_fields(tmp_path):
    frames = labelled(optional=False)
    write_db(frames, tmp_path / "in.db")
    convert_file(tmp_path / "in.db", tmp_path / "out.bp", "db-set", None)
    assert_equal(read_all(tmp_path / "out.bp"), frames)
    assert summarize(tmp_path / "out.bp")["method"] == "unknown"


def test_hdf5_round_trip_takes_name_and_method_from_the_file(tmp_path):
    frames = labelled()
    write_hdf5(frames, tmp_path / "in.h5", "h5-set", method="GFN2-xTB")
    read, meta = read_hdf5(tmp_path / "in.h5")
    assert_equal(read, frames)
    assert meta == {"name": "h5-set", "method": "GFN2-xTB"}
    convert_file(tmp_path / "in.h5", tmp_path / "out.bp", "h5-set", None)
    assert_equal(read_all(tmp_path / "out.bp"), frames)
    with open_bp(tmp_path / "out.bp") as ds:
        assert (ds.name, ds.method) == ("h5-set", "GFN2-xTB")


def test_hdf5_layout_is_the_documented_one(tmp_path):
    write_hdf5(labelled(), tmp_path / "in.h5", "h5-set")
    with h5py.File(tmp_path / "in.h5") as fh:
        layout = {name: (str(fh[name].dtype), fh[name].shape[1:]) for name in fh}
        assert layout == {"numbers": ("int64", ()), "positions": ("float64", (3,)), "forces": ("float64", (3,)),
                          "cell": ("float64", (3, 3)), "pbc": ("uint8", (3,)), "energy": ("float64", ()),
                          "stress": ("float64", (6,)), "natoms": ("int64", ()), "offsets": ("int64", ()),
                          "charge": ("float64", ()), "spin": ("float64", ()), "magmoms": ("float64", ())}
        assert set(fh.attrs) == {"name", "method", "schema_version", "units"}


def test_hdf5_narrower_dtypes_that_cast_safely_are_accepted(tmp_path):
    frames = labelled(optional=False)
    write_hdf5(frames, tmp_path / "in.h5", "h5-set")
    h5_edit(tmp_path / "in.h5", _replace("natoms", lambda v: v.astype(np.int32)))
    h5_edit(tmp_path / "in.h5", _replace("pbc", lambda v: v.astype(bool)))
    assert_equal(read_hdf5(tmp_path / "in.h5")[0], frames)
    h5_edit(tmp_path / "in.h5", _replace("numbers", lambda v: v.astype(np.float64)))
    with pytest.raises(DataError, match="in.h5: field 'numbers': dtype float64, expected int64"):
        read_hdf5(tmp_path / "in.h5")


def test_inspect_table_and_json(tmp_path):
    frames = labelled()
    write_bp(frames, tmp_path / "d.bp", "insp", attrs={"seed": 3}, method="EMT")
    proc = run_cli(["data", "inspect", str(tmp_path / "d.bp"), "--json"])
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    per_atom = frames.energy_S / frames.natoms_S
    assert (info["name"], info["method"], info["schema_version"]) == ("insp", "EMT", 2)
    assert (info["n_structures"], info["n_atoms"], info["n_with_stress"]) == (9, frames.n_atoms, 6)
    assert info["energy_per_atom_mean"] == pytest.approx(per_atom.mean(), rel=1e-14)
    assert info["force_rms"] == pytest.approx(np.sqrt(np.mean(frames.forces_N3 ** 2)), rel=1e-14)
    assert info["optional_fields"] == ["charge", "spin", "magmoms"]
    assert set(info["elements"]) >= {"Cu", "Au"} and info["attrs"]["seed"] == 3
    proc = run_cli(["data", "inspect", str(tmp_path / "d.bp")])
    assert proc.returncode == 0, proc.stderr
    for text in ("method           EMT", "stress           6 of 9 structures", "charge spin magmoms", "seed"):
        assert text in proc.stdout, text


# ---------------------------------------------------------------- schema versions


def write_v1(frames: Frames, path: Path) -> None:
    """A dataset exactly as schema-1 exaforce wrote it: no method, no optionals, no manifest."""
    per_atom = frames.energy_S / frames.natoms_S
    attrs = {"name": "old", "schema_version": 1, "units": bp.UNITS_V1, "voigt_order": "xx yy zz yz xz xy",
             "elements": "Cu Au", "n_structures": len(frames), "n_atoms": frames.n_atoms,
             "energy_mean": float(frames.energy_S.mean()), "energy_std": float(frames.energy_S.std()),
             "energy_per_atom_mean": float(per_atom.mean()), "energy_per_atom_std": float(per_atom.std()),
             "created_by": "exaforce"}
    bp._write_engine(frames.without_optional(), attrs, path)


def test_version_1_datasets_still_read(tmp_path):
    frames = labelled(optional=False)
    write_v1(frames, tmp_path / "v1.bp")
    with open_bp(tmp_path / "v1.bp") as ds:
        assert (ds.schema_version, ds.method, ds.optional) == (1, "unknown", ())
        assert_equal(ds.read(0, len(ds)), frames)
        assert ds.read(3, 0).optional == ()
    info = summarize(tmp_path / "v1.bp")  # v1 stored no force RMS: computed from the data
    assert info["force_rms"] == pytest.approx(np.sqrt(np.mean(frames.forces_N3 ** 2)), rel=1e-14)


def test_unknown_schema_version_is_refused_by_inspect(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(bp, "SCHEMA_VERSION", 99)
        write_bp(labelled(), tmp_path / "future.bp", "f")
    proc = run_cli(["data", "inspect", str(tmp_path / "future.bp")], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"exaforce: error: {tmp_path / 'future.bp'}: field 'schema_version': "
                                  "schema_version 99 is newer"), proc.stderr


# ---------------------------------------------------------------- bad data: clear error, exit 2, nothing written


@pytest.fixture()
def dataset(tmp_path) -> Path:
    write_bp(labelled(), tmp_path / "d.bp", "d")
    return tmp_path / "d.bp"


@pytest.mark.timeout(120)  # ADIOS2 itself would wait forever on a truncated file
def test_truncated_data_file(dataset):
    data = dataset / "data.0"
    os.truncate(data, data.stat().st_size // 2)
    with pytest.raises(DataError, match="d.bp: field 'data.0': file data.0 has .* truncated"):
        open_bp(dataset)
    proc = run_cli(["data", "inspect", str(dataset)], timeout=60)
    assert proc.returncode == 2 and "truncated" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.timeout(120)
def test_truncated_schema_1_dataset_without_manifest(tmp_path):
    write_v1(labelled(optional=False), tmp_path / "v1.bp")
    data = tmp_path / "v1.bp" / "data.0"
    os.truncate(data, data.stat().st_size // 2)
    with pytest.raises(DataError, match="v1.bp: field 'data': data files hold .* truncated"):
        open_bp(tmp_path / "v1.bp")


def test_missing_index_file(dataset):
    (dataset / "md.idx").unlink()
    with pytest.raises(DataError, match="d.bp: field 'md.idx': missing file md.idx"):
        open_bp(dataset)


def test_missing_index_file_of_schema_1_dataset(tmp_path):
    write_v1(labelled(optional=False), tmp_path / "v1.bp")
    (tmp_path / "v1.bp" / "md.idx").unlink()
    with pytest.raises(DataError, match="v1.bp: field 'md.idx': missing file"):
        open_bp(tmp_path / "v1.bp")


def test_missing_manifest_of_schema_2_dataset(dataset):
    (dataset / bp.MANIFEST).unlink()
    with pytest.raises(DataError, match="manifest.json.*incomplete copy"):
        open_bp(dataset)


def _h5(tmp_path: Path, edit) -> Path:
    path = tmp_path / "bad.h5"
    write_hdf5(labelled(), path, "bad")
    h5_edit(path, edit)
    return path


def _replace(name: str, fix):
    def edit(fh):
        value = fh[name][()]
        del fh[name]
        fh[name] = fix(value)
    return edit


def _set_row(name: str, row, value):
    def fix(array):
        array[row] = value
        return array
    return _replace(name, fix)


H5_CASES = {
    "nan-energy": (_set_row("energy", 3, np.nan), "frame 3: field 'energy': non-finite"),
    "inf-force": (_set_row("forces", (20, 1), np.inf), "frame {atom20}: field 'forces': non-finite"),
    "nan-stress-component": (_set_row("stress", (2, 4), np.nan), "frame 2: field 'stress'"),
    "short-forces": (_replace("forces", lambda f: f[:-1]), "field 'forces': {n_minus_1} rows, expected {n}"),
    "missing-energy": (lambda fh: fh.__delitem__("energy"), "field 'energy': missing dataset"),
    "future-version": (lambda fh: fh.attrs.__setitem__("schema_version", 7), "field 'schema_version'"),
    "other-units": (lambda fh: fh.attrs.__setitem__("units", "energy=kcal/mol"), "field 'units'"),
    "bad-offsets": (_set_row("offsets", 4, 1), "frame 4: field 'offsets'"),
}


@pytest.mark.parametrize("case", sorted(H5_CASES))
def test_convert_bad_hdf5(tmp_path, case):
    edit, where = H5_CASES[case]
    frames = labelled()
    where = where.format(atom20=int(np.searchsorted(frames.offsets_S, 20, "right") - 1),
                         n=frames.n_atoms, n_minus_1=frames.n_atoms - 1)
    src = _h5(tmp_path, edit)
    proc = run_cli(["data", "convert", str(src), "--out", str(tmp_path / "out.bp"), "--name", "x"])
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"exaforce: error: {src}: {where}"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert entries(tmp_path) == ["bad.h5"]  # no partial output


def test_convert_bad_asedb_row_names_structure_and_row_id(tmp_path):
    frames = labelled(optional=False)
    frames.energy_S[4] = np.inf
    write_db(frames, tmp_path / "bad.db")
    with pytest.raises(DataError, match=r"bad.db: frame 4: field 'energy': non-finite value .*\(ase.db row id 5\)"):
        convert_file(tmp_path / "bad.db", tmp_path / "out.bp", "x", None)
    assert entries(tmp_path) == ["bad.db"]


def test_convert_missing_asedb_creates_nothing(tmp_path):
    with pytest.raises(DataError, match="nope.db: no such file"):
        convert_file(tmp_path / "nope.db", tmp_path / "out.bp", "x", None)
    assert entries(tmp_path) == []


def test_convert_file_that_is_not_a_database(tmp_path):
    (tmp_path / "junk.db").write_text("not sqlite\n" * 100)
    with pytest.raises(DataError, match="junk.db: not a readable ASE database"):
        convert_file(tmp_path / "junk.db", tmp_path / "out.bp", "x", None)


# ---------------------------------------------------------------- several inputs (one process; MPI in tests/mpi)


@pytest.fixture()
def three_sources(tmp_path) -> dict[str, Frames]:
    parts = {"a": labelled(1), "b": labelled(2, optional=False), "c": labelled(5)}
    write_extxyz(parts["a"], tmp_path / "a.xyz")
    write_db(parts["b"], tmp_path / "b.db")
    write_hdf5(parts["c"], tmp_path / "c.h5", "c", "GFN2-xTB")
    return parts


def test_convert_several_inputs_into_a_folder(tmp_path, three_sources):
    sources = [tmp_path / n for n in ("a.xyz", "b.db", "c.h5")]
    proc = run_cli(["data", "convert", *map(str, sources), "--out", str(tmp_path / "all"), "--name", "mix"])
    assert proc.returncode == 0, proc.stderr
    assert entries(tmp_path / "all") == ["a.bp", "b.bp", "c.bp"]
    for stem, frames in three_sources.items():
        assert_equal(read_all(tmp_path / "all" / f"{stem}.bp"), frames)
    assert summarize(tmp_path / "all" / "c.bp")["method"] == "GFN2-xTB"


def test_one_bad_input_leaves_no_folder(tmp_path, three_sources):
    h5_edit(tmp_path / "c.h5", _set_row("energy", 0, np.nan))
    outcome = convert([tmp_path / n for n in ("a.xyz", "b.db", "c.h5")], tmp_path / "all", "mix")
    assert outcome.n_failed == 1 and "c.h5: frame 0: field 'energy'" in outcome.failures[0]
    assert entries(tmp_path) == ["a.xyz", "b.db", "c.h5"]  # no folder, no hidden temp


def test_several_inputs_refusals(tmp_path, three_sources):
    (tmp_path / "x").mkdir()
    shutil.copy(tmp_path / "a.xyz", tmp_path / "x" / "a.extxyz")
    with pytest.raises(DataError, match=r"inputs share the stem\(s\) \['a'\]"):
        convert([tmp_path / "a.xyz", tmp_path / "x" / "a.extxyz"], tmp_path / "all", "mix")
    with pytest.raises(DataError, match="unknown input format '.cif'"):
        convert([tmp_path / "a.xyz", tmp_path / "s.cif"], tmp_path / "all", "mix")
    with pytest.raises(DataError, match="x: exists and is not a folder holding only"):
        convert([tmp_path / "a.xyz", tmp_path / "b.db"], tmp_path / "x", "mix", overwrite=True)
    assert entries(tmp_path / "x") == ["a.extxyz"]  # not ours: untouched


def test_several_inputs_overwrite_replaces_the_folder(tmp_path, three_sources):
    sources = [tmp_path / "a.xyz", tmp_path / "b.db"]
    convert(sources, tmp_path / "all", "first")
    with pytest.raises(DataError, match="all: already exists"):
        convert(sources, tmp_path / "all", "second")
    assert convert(sources[:1] + [tmp_path / "c.h5"], tmp_path / "all", "second", overwrite=True).n_failed == 0
    assert entries(tmp_path / "all") == ["a.bp", "c.bp"]
    assert summarize(tmp_path / "all" / "a.bp")["name"] == "second"


def _labelled_elsewhere(n: int = 3) -> tuple[list, list[tuple[float, np.ndarray, np.ndarray]]]:
    """Cells whose EMT labels sit under MACE's REF_* names (and a second set under dft_*), no calculator."""
    frames, truth = [], []
    for k in range(n):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.rattle(0.05, seed=k)
        atoms.calc = EMT()
        e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        plain = atoms.copy()  # no calculator: labels only as info/arrays
        plain.info.update(REF_energy=e, REF_stress=s, dft_energy=e + 1.0)
        plain.arrays.update(REF_forces=f, dft_forces=2 * f)
        frames.append(plain)
        truth.append((e, f, s))
    return frames, truth


def test_labels_under_mace_ref_keys_or_named_keys_convert(tmp_path):
    import ase.io

    frames, truth = _labelled_elsewhere()
    ase.io.write(tmp_path / "mace.xyz", frames, format="extxyz")
    db = ase.db.connect(tmp_path / "mace.db", append=False)
    for atoms, (e, f, s) in zip(frames, truth):
        bare = ase.Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=True)
        db.write(bare, REF_energy=float(e), data={"REF_forces": f, "REF_stress": s})
    with ase.db.connect(tmp_path / "mace.aselmdb", type="aselmdb") as lmdb_db:
        for atoms, (e, f, s) in zip(frames, truth):
            bare = ase.Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=True)
            lmdb_db.write(bare, REF_energy=float(e), data={"REF_forces": f, "REF_stress": s})
    for source in ("mace.xyz", "mace.db", "mace.aselmdb"):  # the default names are absent: MACE's REF_* are read
        # (ASE's extxyz writer keeps 8 decimals: the tolerances below)
        proc = run_cli(["data", "convert", str(tmp_path / source), "--out", str(tmp_path / f"{source}.bp"),
                        "--name", "m"])
        assert proc.returncode == 0, proc.stderr
        with open_bp(tmp_path / f"{source}.bp") as d:
            got = d.read(0, d.n_structures)
        np.testing.assert_allclose(got.energy_S, [t[0] for t in truth], rtol=1e-9)
        np.testing.assert_allclose(got.forces_N3, np.concatenate([t[1] for t in truth]), rtol=0, atol=1e-8)
        np.testing.assert_allclose(got.stress_S6, np.stack([t[2] for t in truth]), rtol=0, atol=1e-8)
    named = run_cli(["data", "convert", str(tmp_path / "mace.xyz"), "--out", str(tmp_path / "dft.bp"), "--name", "m",
                     "--energy-key", "dft_energy", "--forces-key", "dft_forces"])
    assert named.returncode == 0, named.stderr
    with open_bp(tmp_path / "dft.bp") as d:
        got = d.read(0, d.n_structures)
    np.testing.assert_allclose(got.energy_S, [t[0] + 1.0 for t in truth], rtol=1e-9)
    np.testing.assert_allclose(got.forces_N3, np.concatenate([2 * t[1] for t in truth]), rtol=0, atol=1e-8)


def test_a_missing_named_label_says_where_it_looked(tmp_path):
    import ase.io

    frames, _ = _labelled_elsewhere(1)
    ase.io.write(tmp_path / "mace.xyz", frames, format="extxyz")
    proc = run_cli(["data", "convert", str(tmp_path / "mace.xyz"), "--out", str(tmp_path / "x.bp"), "--name", "m",
                    "--forces-key", "PBE_forces"])
    assert proc.returncode == 2 and not (tmp_path / "x.bp").exists()
    assert ("mace.xyz: frame 0: field 'forces': frame has no forces (looked for 'PBE_forces' in the calculator "
            "results, info and arrays; name another key with `convert --forces-key`)") in proc.stderr
    frames[0].arrays.pop("REF_forces")
    frames[0].arrays.pop("dft_forces")
    ase.io.write(tmp_path / "none.xyz", frames, format="extxyz")
    proc = run_cli(["data", "convert", str(tmp_path / "none.xyz"), "--out", str(tmp_path / "y.bp"), "--name", "m"])
    assert proc.returncode == 2 and "looked for 'forces' and 'REF_forces'" in proc.stderr
