"""Staging under mpiexec -n 2: one copy per node, same paths on every rank, leader errors reach all."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from exaforce.io.bp import write_bp
from exaforce.io.extxyz import write_extxyz
from exaforce.io.schema import Frames
from exaforce.io.synth import synthesize

pytestmark = [pytest.mark.mpi, pytest.mark.data]

RANKS = 2
SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from mpi4py import MPI
    from exaforce.io.stage import StageError, stage_datasets

    out, dest, *sources = (Path(a) for a in sys.argv[1:])
    world = MPI.COMM_WORLD  # fine in a test driver; library code only sees node_comm
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    record = {"rank": world.rank, "node_rank": node.rank, "node_size": node.size}
    for attempt in ("first", "second"):
        logs = []
        paths = stage_datasets(sources, dest, node, log=logs.append)
        record[attempt] = {"paths": [str(p) for p in paths], "logs": logs}
    try:
        stage_datasets(sources + [dest.parent / "missing.bp"], dest, node, log=lambda m: None)
        record["error"] = None
    except StageError as err:
        record["error"] = str(err)
    (out / f"rank{world.rank}.json").write_text(json.dumps(record))
""")


def test_one_copy_per_node_same_paths_everywhere(tmp_path):
    pfs = tmp_path / "pfs"
    pfs.mkdir()
    atoms = synthesize(8, seed=3)
    write_bp(Frames.from_atoms(atoms), pfs / "syn.bp", "syn")
    write_extxyz(atoms, pfs / "syn.xyz")
    script = tmp_path / "stage_driver.py"
    script.write_text(SCRIPT)
    mpiexec = Path(sys.executable).parent / "mpiexec"
    dest = tmp_path / "nvme"
    proc = subprocess.run(
        [str(mpiexec), "-n", str(RANKS), sys.executable, str(script), str(tmp_path), str(dest),
         str(pfs / "syn.bp"), str(pfs / "syn.xyz")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(RANKS)]
    assert all(r["node_size"] == RANKS for r in records)  # one node: both ranks share it

    expected = [str(dest / "syn.bp"), str(dest / "syn.xyz")]
    for attempt in ("first", "second"):
        assert [r[attempt]["paths"] for r in records] == [expected] * RANKS
    copies = [m for r in records for m in r["first"]["logs"] if "copied" in m]
    assert len(copies) == 2, copies  # one copy per dataset, by the leader only
    leader = next(r for r in records if r["node_rank"] == 0)
    assert len([m for m in leader["first"]["logs"] if "copied" in m]) == 2
    assert all(not r["second"]["logs"] or r is leader for r in records)
    assert sum("skipped" in m for m in leader["second"]["logs"]) == 2
    assert sorted(p.name for p in dest.iterdir()) == ["syn.bp", "syn.xyz"]

    # A failure on the leader reaches every rank as the same StageError (no hang).
    assert all(r["error"] and "missing.bp" in r["error"] for r in records)
    assert len({r["error"] for r in records}) == 1
