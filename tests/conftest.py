"""Shared test helpers: the venv's mpiexec, running ranks as subprocesses with a timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = Path(sys.executable).parent / "mpiexec"

# Start-up calibrations are cached under $XDG_CACHE_HOME (exaforce.training.calibrate): tests never
# read or fill the user's cache, and each test starts with an empty one (module fixtures: the session's).
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="exaforce-tests-cache-")


@pytest.fixture(autouse=True)
def _own_calibration_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))


def run_mpi(n: int, args: list[str], timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`mpiexec -n n python args…`; a hung rank fails the test through the timeout instead of hanging CI."""
    if not MPIEXEC.exists():
        pytest.fail(f"{MPIEXEC} missing: the mpich wheel provides it (run envs/local/setup.sh)")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [str(MPIEXEC), "-n", str(n), sys.executable, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO, env=env)


def run_mpi_script(n: int, script: str, tmp_path: Path, args: tuple = (), timeout: float = 240) -> dict:
    """Runs tests/mpi/<script> OUT *args on n ranks; the script writes its result as JSON to OUT."""
    import json

    out = tmp_path / f"{Path(script).stem}-{n}-{'-'.join(map(str, args))}.json"
    proc = run_mpi(n, [str(REPO / "tests/mpi" / script), str(out), *map(str, args)], timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def run_cli(args: list[str], timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real `exaforce` entry point in a subprocess (as a user types it)."""
    cmd = [str(Path(sys.executable).parent / "exaforce"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def make_emt_dataset(root: Path, structures: int, seed: int = 0, name: str = "emt") -> Path:
    """ROOT/NAME.bp: EMT metals from the real `exaforce data synth` and `data convert`."""
    for args in (["data", "synth", "--out", f"{name}.extxyz", "--structures", str(structures), "--seed", str(seed)],
                 ["data", "convert", f"{name}.extxyz", "--out", f"{name}.bp", "--name", name]):
        result = run_cli(args, cwd=root)
        assert result.returncode == 0, result.stderr
    return root / f"{name}.bp"


def small_run_config(root: Path, dataset: str = "emt.bp", name: str = "run.toml", **run) -> Path:
    """ROOT/NAME: the small preset on DATASET (global batch 2) with the given [run] keys."""
    import json

    keys = "".join(f"{key} = {json.dumps(value)}\n" for key, value in run.items())
    path = root / name
    path.write_text(f'[run]\n{keys}[model]\npreset = "small"\n[data]\ntrain = ["{dataset}"]\nglobal_batch_size = 2\n')
    return path


def predict_float64(model, atoms, training: bool = False):
    """energy_forces_stress of one structure in float64 on the model's own cutoffs (model tests)."""
    import torch

    from exaforce.graph import batch_from_atoms
    from exaforce.model.potential import energy_forces_stress

    batch = batch_from_atoms([atoms], model.species_table(), model.cfg.cutoff, model.cfg.three_body_cutoff)
    return energy_forces_stress(model, batch.to("cpu", torch.float64), training=training)
