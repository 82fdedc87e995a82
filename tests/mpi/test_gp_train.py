"""`exaforce train` with graph parallelism (parallel.gp = 2 on 2 ranks) through the real CLI, float64,
the small preset on 16 EMT structures (4 held out), every structure split (gp_min_atoms = 0): the
losses and validation errors equal one rank's training of the same batches; one checkpoint is written
per GP group (no part twice), a run stopped after step 2 and resumed equals the straight run, and the
gp = 2 checkpoint continues on one rank."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import make_emt_dataset, run_mpi
from exaforce import checkpoint

pytestmark = [pytest.mark.mpi, pytest.mark.equivalence]

STEPS = 4


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gp-train")
    make_emt_dataset(folder, 16, seed=3)
    return folder


def config(root: Path, name: str, gp: int) -> Path:
    run = {"out_dir": str(root / name), "steps": STEPS, "dtype": "float64", "checkpoint_every": 2,
           "keep_checkpoints": 0, "log_every": 1, "val_every": 2}
    lines = ["[run]", *(f"{k} = {json.dumps(v)}" for k, v in run.items()),
             "[data]", "global_batch_size = 4", "micro_batches = 2",
             "[[data.datasets]]", f"path = {json.dumps(str(root / 'emt.bp'))}", "val_fraction = 0.25",
             "[model]", 'preset = "small"', "blocks = 2", "[parallel]", f"gp = {gp}", "gp_min_atoms = 0"]
    path = root / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def exaforce(ranks: int, *args: str) -> subprocess.CompletedProcess:
    proc = run_mpi(ranks, ["-m", "exaforce.cli", *args], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def records(run_dir: Path, rank: int = 0) -> dict[int, dict]:
    """Step records by step (a step recorded again: the later record)."""
    lines = (run_dir / f"perf/rank-{rank:05d}.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["kind"] == "step"}


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(b), 1e-300)


@pytest.mark.slow
def test_graph_parallel_training_equals_one_rank_and_resumes(root):
    serial = exaforce(1, "train", "--config", str(config(root, "serial", gp=1)))
    assert "graph parallel" not in serial.stdout
    split = exaforce(2, "train", "--config", str(config(root, "split", gp=2)))
    assert "graph parallel: 2 ranks per group" in split.stdout and "gp=2" in split.stdout
    assert "graph partition: rank 0 (gp 0) owns" in split.stdout and "rank 1 (gp 1) owns" in split.stdout
    one, two = records(root / "serial"), records(root / "split")
    assert sorted(two) == list(range(1, STEPS + 1))
    for step in one:  # float64: the same losses, validation errors and structure counts
        assert close(two[step]["loss"], one[step]["loss"]), (step, two[step]["loss"], one[step]["loss"])
        assert close(two[step]["grad_norm"], one[step]["grad_norm"])
        if "val" in one[step]:
            for key in ("energy_mev_per_atom", "forces_mev_per_a"):
                assert close(two[step]["val"]["default"][key], one[step]["val"]["default"][key])
    second = records(root / "split", rank=1)
    assert all(r["gp_index"] == 1 and r["gp_work"]["owned_atoms"] > 0 for r in second.values())
    assert all(r["gp_index"] == 0 for r in two.values())

    folder = checkpoint.step_folder(root / "split", STEPS)
    marker = checkpoint.complete(folder)
    assert (marker["gp"], marker["world_size"]) == (2, 2)
    assert sorted(marker["files"]) == ["dense.pt", "rng-rank00000.pt", "rng-rank00001.pt"]

    # Stopped after step 2, resumed: the straight run's losses, bit for bit; the same checkpoint continued
    # on one rank without graph parallelism: the same losses (to rounding: another summation order).
    stopped = root / "stopped"
    exaforce(2, "train", "--config", str(config(root, "stopped", gp=2)), "--steps", "2")
    shutil.copytree(stopped, root / "onto-one")
    resumed = exaforce(2, "train", "--config", str(config(root, "stopped", gp=2)), "--resume")
    assert f"resumed from {checkpoint.step_folder(stopped, 2)} at step 2" in resumed.stdout
    assert {s: r["loss"] for s, r in records(stopped).items()} == {s: r["loss"] for s, r in two.items()}
    continued = exaforce(1, "train", "--config", str(config(root, "onto-one", gp=1)), "--resume")
    assert "at step 2" in continued.stdout
    got = records(root / "onto-one")
    assert all(close(got[s]["loss"], two[s]["loss"]) for s in (3, 4)), ({s: got[s]["loss"] for s in (3, 4)}, two)
