"""`data convert` of several inputs under mpiexec -n 2: files split round-robin over ranks, every rank
reports its own failures, any failure means exit 2 everywhere and no output folder."""

from pathlib import Path

import ase.db
import numpy as np
import pytest

from conftest import run_mpi
from exaforce.io.bp import open_bp
from exaforce.io.extxyz import write_extxyz
from exaforce.io.hdf5 import write_hdf5
from exaforce.io.schema import Frames
from exaforce.io.synth import synthesize

pytestmark = [pytest.mark.mpi, pytest.mark.data]


def sources(tmp_path: Path) -> dict[str, Frames]:
    """Rank 0 gets a.xyz and c.h5, rank 1 gets b.db."""
    parts = {stem: Frames.from_atoms(synthesize(5, seed)) for seed, stem in enumerate("abc")}
    write_extxyz(parts["a"], tmp_path / "a.xyz")
    with ase.db.connect(tmp_path / "b.db") as db:
        for atoms in parts["b"].to_atoms():
            db.write(atoms)
    write_hdf5(parts["c"], tmp_path / "c.h5", "c", "EMT")
    return parts


def convert(tmp_path: Path):
    inputs = [str(tmp_path / name) for name in ("a.xyz", "b.db", "c.h5")]
    return run_mpi(2, ["-m", "exaforce.cli", "data", "convert", *inputs, "--out", str(tmp_path / "all"),
                       "--name", "mix"], timeout=180)


def test_inputs_are_converted_over_ranks(tmp_path):
    parts = sources(tmp_path)
    proc = convert(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "rank 0: converted" in proc.stdout and "rank 1: converted" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["a.bp", "b.bp", "c.bp"]
    for stem, frames in parts.items():
        with open_bp(tmp_path / "all" / f"{stem}.bp") as ds:
            read = ds.read(0, len(ds))
        for field, value in frames.columns().items():
            assert np.array_equal(getattr(read, field), value, equal_nan=True), (stem, field)


def test_failures_on_both_ranks_are_reported_and_nothing_is_left(tmp_path):
    sources(tmp_path)
    lines = (tmp_path / "a.xyz").read_text().splitlines()
    lines[3] = lines[3].split()[0] + " 1.0 abc 2.0 0 0 0"  # frame 0, atom 1: not a number
    (tmp_path / "a.xyz").write_text("\n".join(lines) + "\n")
    (tmp_path / "b.db").write_text("not a database\n" * 100)
    proc = convert(tmp_path)
    assert proc.returncode != 0
    assert f"exaforce: error: {tmp_path / 'a.xyz'}: frame 0" in proc.stderr  # from rank 0
    assert f"exaforce: error: {tmp_path / 'b.db'}: not a readable ASE database" in proc.stderr  # from rank 1
    assert "2 of 3 inputs failed; nothing written" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.xyz", "b.db", "c.h5"]
