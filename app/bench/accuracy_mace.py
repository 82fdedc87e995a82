"""MACE-small as `bench accuracy --compare mace` trains it: through MACE's own `run_train`, its defaults.

MACE-small as in issue 18: 32x0e+32x1o, max_L 1, r_max 5 Å, 2 interactions, batch 4, lr 0.01, EMA
(0.99), float32, E0s the training set's average, 5 % of the training cells held out for its own
validation (as its command line requires one). Everything else is run_train's default (loss
"weighted": energy and forces, AMSGrad Adam, ReduceLROnPlateau). Its process keeps its freed heap
as exaforce's CPU steps do (accuracy.reference_environment: the same treatment for both trainers).

run_train has no time budget: it is started with a large epoch limit and killed when the budget
is spent. Its checkpoints (the EMA weights of each epoch whose validation loss improved) are
written at epoch ends, so the model evaluated is the newest checkpoint, and the wall time
reported is when that checkpoint was written (≤ the budget; the part-epoch after it is lost to
MACE, which this accounting does not charge it for). run_train then runs once more with
`--restart_latest` and the epoch limit set to that checkpoint's epoch: it trains nothing and writes
the model file, as it would at the end of a full run.

Needs mace-torch and its training command line's imports (envs/local/requirements-reference.txt).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from ase import Atoms
from ase.io import write

from exaforce.bench.launcher import STDERR_TAIL, launch

MACE_SMALL = ["--model", "MACE", "--hidden_irreps", "32x0e+32x1o", "--max_L", "1", "--r_max", "5.0",
              "--num_interactions", "2", "--batch_size", "4", "--valid_batch_size", "8", "--lr", "0.01",
              "--ema", "--ema_decay", "0.99", "--default_dtype", "float32", "--device", "cpu", "--E0s", "average",
              "--valid_fraction", "0.05", "--eval_interval", "1",
              "--energy_key", "REF_energy", "--forces_key", "REF_forces", "--stress_key", "REF_stress"]
VALID_FRACTION = 0.05
BATCH = 4
EPOCH_LIMIT = 100_000


def write_mace_training_file(structures: list[Atoms], path: Path) -> None:
    """extxyz with the labels under MACE's REF_ keys (ASE's own keys are reserved for calculators)."""
    labelled = []
    for reference in structures:
        atoms = Atoms(reference.numbers, reference.positions, cell=reference.cell, pbc=reference.pbc)
        atoms.info["REF_energy"] = reference.get_potential_energy()
        atoms.info["REF_stress"] = reference.get_stress(voigt=True)
        atoms.arrays["REF_forces"] = reference.get_forces()
        labelled.append(atoms)
    write(path, labelled, format="extxyz")


def run_train_command(work: Path, train_file: Path, seed: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mace.cli.run_train", "--name", "mace", "--seed", str(seed),
            "--train_file", str(train_file), "--work_dir", str(work), *MACE_SMALL, *extra]


def train_mace(root: Path, train: list[Atoms], budget_s: float, seed: int, env: dict[str, str],
               log: Callable[[str], None]) -> dict:
    """Trains MACE-small for `budget_s` (process start included); its model file and the run's figures."""
    work = root / "mace"
    work.mkdir()
    train_file = root / "train_mace.xyz"
    write_mace_training_file(train, train_file)
    log(f"bench accuracy: MACE-small through mace.cli.run_train, budget {budget_s:g} s (process start included)")
    output = root / "mace-train.log"
    started = time.time()
    peak = 0
    with open(output, "w") as out:
        proc = subprocess.Popen(run_train_command(work, train_file, seed, "--max_num_epochs", str(EPOCH_LIMIT)),
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work)
        while proc.poll() is None:
            peak = max(peak, peak_rss_bytes(proc.pid))
            if time.time() - started >= budget_s:
                proc.kill()
                break
            time.sleep(1.0)
        proc.wait()
    if proc.returncode not in (0, -9):
        raise RuntimeError(f"MACE run_train failed (exit {proc.returncode}):\n{output.read_text()[-STDERR_TAIL:]}")
    checkpoints = sorted((work / "checkpoints").glob("*_epoch-*.pt"), key=lambda p: p.stat().st_mtime)
    if not checkpoints:
        raise RuntimeError(f"MACE finished no epoch within the budget of {budget_s:g} s; see {output}")
    newest = checkpoints[-1]
    epoch = int(re.search(r"_epoch-(\d+)\.pt$", newest.name).group(1))
    wall_s = newest.stat().st_mtime - started
    launch(run_train_command(work, train_file, seed, "--max_num_epochs", str(epoch), "--restart_latest"),
           "MACE run_train --restart_latest (writing the model file)", env)
    model_file = next((work / "checkpoints").glob("*.model"), None) or next(work.glob("*.model"))
    per_epoch = round(len(train) * (1 - VALID_FRACTION))
    epochs_done = epoch + 1  # MACE counts epochs from 0
    return {"wall_s": wall_s, "steps": epochs_done * -(-per_epoch // BATCH), "structures_seen": epochs_done * per_epoch,
            "atoms_per_s": epochs_done * sum(len(a) for a in train) * (1 - VALID_FRACTION) / wall_s,
            "peak_mem_gib_per_rank": peak / 2**30, "epochs": epochs_done, "model_file": str(model_file)}


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def mace_calculator(model_file: Path):
    """MACE's own ASE calculator on the model file run_train wrote (a whole pickled module: MACE's
    format, written by the reference in this benchmark's own temporary folder)."""
    from mace.calculators import MACECalculator

    return MACECalculator(model_paths=str(model_file), device="cpu", default_dtype="float32")
