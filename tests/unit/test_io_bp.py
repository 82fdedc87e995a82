"""ADIOS2 BP5 datasets: exact round trip, hyperslab reads, atomic writes, validation on open."""

import numpy as np
import pytest

from exaforce.io import bp
from exaforce.io.bp import open_bp, write_bp
from exaforce.io.sampler import shard_range
from exaforce.io.schema import SCHEMA_VERSION, DataError, Frames
from exaforce.io.synth import synthesize

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def frames() -> Frames:
    frames = Frames.from_atoms(synthesize(40, seed=21))
    frames.stress_S6[3] = np.nan  # a structure without stress must survive too
    return frames


def _assert_bit_equal(a: Frames, b: Frames) -> None:
    assert a.optional == b.optional
    for field, x in a.columns().items():
        y = getattr(b, field)
        assert x.dtype == y.dtype, field
        assert x.shape == y.shape, field
        assert np.array_equal(x, y, equal_nan=True), field


def _entries(directory):
    return sorted(p.name for p in directory.iterdir())


def test_round_trip_is_exact_with_attrs(tmp_path, frames):
    path = tmp_path / "syn.bp"
    write_bp(frames, path, "synthetic-emt", attrs={"level": "EMT", "seed": 21, "cutoff": 6.0})
    with open_bp(path) as ds:
        assert (ds.name, ds.n_structures, ds.n_atoms, len(ds)) == ("synthetic-emt", 40, frames.n_atoms, 40)
        assert np.array_equal(ds.natoms_S, frames.natoms_S)
        _assert_bit_equal(ds.read(0, len(frames)), frames)
        attrs = ds.attrs
    assert attrs["schema_version"] == SCHEMA_VERSION
    assert attrs["created_by"] == "exaforce"
    assert attrs["voigt_order"] == "xx yy zz yz xz xy"
    assert (attrs["n_structures"], attrs["n_atoms"]) == (40, frames.n_atoms)
    assert attrs["energy_mean"] == pytest.approx(frames.energy_S.mean(), rel=1e-15)
    assert attrs["energy_std"] == pytest.approx(frames.energy_S.std(), rel=1e-15)
    assert set(attrs["elements"].split()) <= {"Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt"}
    assert "eV" in attrs["units"]
    assert (attrs["level"], attrs["seed"], attrs["cutoff"]) == ("EMT", 21, 6.0)


@pytest.mark.parametrize("start,count", [(0, 1), (13, 9), (39, 1), (17, 0)])
def test_hyperslab_equals_select(tmp_path, frames, start, count):
    path = tmp_path / "syn.bp"
    write_bp(frames, path, "syn")
    with open_bp(path) as ds:
        _assert_bit_equal(ds.read(start, count), frames.select(np.arange(start, start + count)))


def test_read_touches_only_the_hyperslab(tmp_path, frames):
    path = tmp_path / "syn.bp"
    write_bp(frames, path, "syn")
    with open_bp(path) as ds:
        sizes = []
        real_get = ds._engine.get
        ds._engine.get = lambda var, out, mode: (sizes.append((var.name(), out.shape[0])), real_get(var, out, mode))
        ds.read(10, 5)
    n_atoms = int(frames.natoms_S[10:15].sum())
    assert sorted(sizes) == sorted([("numbers", n_atoms), ("positions", n_atoms), ("forces", n_atoms),
                                    ("cell", 5), ("pbc", 5), ("energy", 5), ("stress", 5)])


def test_read_out_of_range(tmp_path, frames):
    path = tmp_path / "syn.bp"
    write_bp(frames, path, "syn")
    with open_bp(path) as ds, pytest.raises(IndexError, match="syn.bp"):
        ds.read(35, 6)


@pytest.mark.parametrize("n,world", [(0, 3), (10, 3), (7, 7), (5, 8), (1000, 16)])
def test_shard_range_is_contiguous_and_balanced(n, world):
    ranges = [shard_range(n, r, world) for r in range(world)]
    counts = [c for _, c in ranges]
    assert [s for s, _ in ranges] == list(np.cumsum([0] + counts[:-1]))
    assert sum(counts) == n
    assert counts == [n // world + (r < n % world) for r in range(world)]


def test_shard_range_rejects_bad_rank():
    with pytest.raises(ValueError):
        shard_range(10, 3, 3)


# ---------------------------------------------------------------- atomic writes


class Boom(RuntimeError):
    pass


def _fail_on_third_put(monkeypatch):
    real_put, calls = bp._put, []

    def put(*args):
        calls.append(args[2])
        if len(calls) == 3:
            raise Boom("simulated failure mid-write")
        real_put(*args)

    monkeypatch.setattr(bp, "_put", put)


def test_failed_write_leaves_nothing(tmp_path, frames, monkeypatch):
    _fail_on_third_put(monkeypatch)
    with pytest.raises(Boom):
        write_bp(frames, tmp_path / "syn.bp", "syn")
    assert _entries(tmp_path) == []


def test_existing_dataset_is_refused_and_survives_a_failed_overwrite(tmp_path, frames, monkeypatch):
    path = tmp_path / "syn.bp"
    old = frames.select(np.arange(5))
    write_bp(old, path, "old")
    with pytest.raises(FileExistsError, match="syn.bp"):
        write_bp(frames, path, "new")
    _fail_on_third_put(monkeypatch)
    with pytest.raises(Boom):
        write_bp(frames, path, "new", overwrite=True)
    assert _entries(tmp_path) == ["syn.bp"]
    with open_bp(path) as ds:
        assert ds.name == "old"
        _assert_bit_equal(ds.read(0, 5), old)


def test_overwrite_replaces_atomically(tmp_path, frames):
    path = tmp_path / "syn.bp"
    write_bp(frames.select(np.arange(5)), path, "old")
    write_bp(frames, path, "new", overwrite=True)
    assert _entries(tmp_path) == ["syn.bp"]
    with open_bp(path) as ds:
        assert (ds.name, ds.n_structures) == ("new", 40)
        _assert_bit_equal(ds.read(0, 40), frames)


def test_reserved_attr_is_refused(tmp_path, frames):
    with pytest.raises(ValueError, match="n_atoms"):
        write_bp(frames, tmp_path / "syn.bp", "syn", attrs={"n_atoms": 3})
    assert _entries(tmp_path) == []


# ---------------------------------------------------------------- validation on open


def test_missing_dataset(tmp_path):
    with pytest.raises(DataError, match="nothing.bp.*no such dataset"):
        open_bp(tmp_path / "nothing.bp")


def test_directory_that_is_not_a_dataset(tmp_path):
    (tmp_path / "junk.bp").mkdir()
    with pytest.raises(DataError, match="junk.bp: not a BP5 dataset \\(a folder without its md.idx"):
        open_bp(tmp_path / "junk.bp")
    for name in bp.ADIOS_FILES:
        (tmp_path / "junk.bp" / name).write_text("garbage")
    with pytest.raises(DataError, match="junk.bp: not a readable ADIOS2 BP5 dataset: ADIOS2 BP5 Engine only "
                                        "supports bp format version 5, found -?\\d+ version$") as err:
        open_bp(tmp_path / "junk.bp")
    assert "\x1b" not in str(err.value)


def test_missing_variable(tmp_path, frames, monkeypatch):
    with monkeypatch.context() as patch:
        patch.delitem(bp.VARIABLES, "stress")
        write_bp(frames, tmp_path / "nostress.bp", "syn")
    with pytest.raises(DataError, match="nostress.bp.*'stress'.*missing variable") as info:
        open_bp(tmp_path / "nostress.bp")
    assert info.value.field == "stress"


def test_newer_schema_is_refused(tmp_path, frames, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(bp, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
        write_bp(frames, tmp_path / "future.bp", "syn")
    with pytest.raises(DataError, match="future.bp.*newer"):
        open_bp(tmp_path / "future.bp")


def test_old_dataset_is_restored_when_the_final_rename_fails(tmp_path, frames, monkeypatch):
    path = tmp_path / "syn.bp"
    old = frames.select(np.arange(5))
    write_bp(old, path, "old")
    real_rename = bp.os.rename

    def rename(src, dst):
        if ".tmp-" in str(src):
            raise OSError("simulated rename failure")
        real_rename(src, dst)

    monkeypatch.setattr(bp.os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        write_bp(frames, path, "new", overwrite=True)
    monkeypatch.undo()
    assert _entries(tmp_path) == ["syn.bp"]
    with open_bp(path) as ds:
        assert ds.name == "old"
        _assert_bit_equal(ds.read(0, 5), old)


def test_no_profile_is_left_behind(tmp_path, frames):
    """ADIOS2 profiles every BP5 engine: not in the dataset, not in /tmp after the reader closes."""
    path = tmp_path / "quiet.bp"
    write_bp(frames, path, "quiet")
    assert "profiling.json" not in _entries(path)
    with open_bp(path) as reader:
        reader.read(0, 1)
    assert not bp._reader_profile(path).exists()
