"""`exaforce bench accuracy`: what a training run of a fixed wall-time budget learns.

Why: speed and memory only matter if the potential that comes out is accurate; the figure of
merit is accuracy per unit of cost. The benchmark generates (seeded) a dense-cell EMT data set —
train 200 cells, test 30 unseen cells and 20 frames of a 500 K Langevin run of a 108-atom Cu3Au
cell — trains through the real CLI (`mpiexec -n R exaforce train`) under `run.max_seconds` = the
budget (start-up included), and evaluates the final model file through the ASE calculator on the
test set: energy, force and stress MAE on all test structures, the random cells and the MD frames.

The training configuration is the project's defaults unless `--config` names a TOML file whose
keys override them (any section; [data] without its datasets: the data are the benchmark's).
"""

from __future__ import annotations

import shutil
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Callable

import numpy as np
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from exaforce.bench.config_file import write_config
from exaforce.bench.launcher import environment, exaforce_command, launch, on_ranks
from exaforce.bench.workloads import dense_cells
from exaforce.device import KEPT_HEAP_TUNABLES

TRAIN_CELLS, TEST_CELLS, MD_FRAMES = 200, 30, 20
MD_TEMPERATURE_K, MD_TIMESTEP_FS, MD_EQUILIBRATION, MD_EVERY = 500.0, 5.0, 200, 20
CU3AU_A = 0.75 * 3.61 + 0.25 * 4.08  # Å, Vegard's law between fcc Cu and Au
SUBSETS = ("all", "random", "md")


def cu3au_md_frames(n_frames: int, seed: int) -> list[Atoms]:
    """L1₂ Cu3Au, 3×3×3 conventional cells (108 atoms), EMT Langevin at 500 K: `n_frames` frames
    MD_EVERY steps apart after MD_EQUILIBRATION steps, labelled."""
    atoms = bulk("Cu", "fcc", a=CU3AU_A, cubic=True).repeat(3)
    atoms.symbols[0::4] = "Au"  # the cube corners of each conventional cell
    atoms.calc = EMT()
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=MD_TEMPERATURE_K, rng=rng)
    dynamics = Langevin(atoms, MD_TIMESTEP_FS * units.fs, temperature_K=MD_TEMPERATURE_K, friction=0.02, fixcm=False,
                        rng=rng)
    dynamics.run(MD_EQUILIBRATION)
    frames = []
    for _ in range(n_frames):
        dynamics.run(MD_EVERY)
        frame = atoms.copy()
        frame.calc = SinglePointCalculator(frame, energy=atoms.get_potential_energy(), forces=atoms.get_forces(),
                                           stress=atoms.get_stress(voigt=True))
        frames.append(frame)
    return frames


def make_data(root: Path, seed: int, env: dict[str, str]) -> tuple[Path, list[Atoms], dict[str, list[Atoms]]]:
    """ROOT/train.bp (the training cells through `data convert`), the training cells, and the test
    structures by subset."""
    train = dense_cells(TRAIN_CELLS, seed)
    test = {"random": dense_cells(TEST_CELLS, seed + 10_000), "md": cu3au_md_frames(MD_FRAMES, seed)}
    write(root / "train.extxyz", train)
    launch(exaforce_command("data", "convert", str(root / "train.extxyz"), "--out", str(root / "train.bp"),
                            "--name", "train"), "bench accuracy: data convert", env)
    return root / "train.bp", train, test


def read_overrides(path: Path) -> dict:
    """A --config file's tables, holding only what bench accuracy lets a candidate change."""
    from exaforce.config import ConfigError, read_table

    table = read_table(path)
    unknown = set(table) - {"run", "data", "model", "loss", "optim", "comm", "parallel"}
    datasets = {"train", "datasets", "stage_dir"} & set(table.get("data", {}))
    if unknown or datasets:
        raise ConfigError(f"{path}: bench accuracy takes [run], [data], [model], [loss], [optim], [comm] and "
                          f"[parallel] keys, but not {sorted(unknown | datasets)} (the data are the benchmark's)")
    return table


def run_config(overrides: dict, data: Path, out_dir: Path, budget_s: float, seed: int):
    """The project's defaults (or the `overrides` tables' keys) on the benchmark's data, stopped by the
    time budget."""
    from exaforce.config import from_dict

    run = {"steps": 1_000_000, "log_every": 10, "seed": seed, **overrides.get("run", {}),
           "out_dir": str(out_dir), "max_seconds": budget_s}
    return from_dict({**overrides, "run": run, "data": {**overrides.get("data", {}), "train": [str(data)]}})


def overrides_text(overrides: dict) -> str:
    """The keys the tables set, as `section.key = value`: so that a log names the candidate it measured."""
    return ", ".join(f"{section}.{key} = {value!r}" for section, keys in overrides.items()
                     for key, value in keys.items()) or "nothing"


def evaluate(calc, test: dict[str, list[Atoms]]) -> dict[str, dict[str, float]]:
    """MAE per subset of an ASE calculator: energy (meV/atom), force components (meV/Å), stress
    components (GPa)."""
    errors: dict[str, dict[str, list[np.ndarray]]] = {s: {"energy": [], "forces": [], "stress": []} for s in SUBSETS}
    for subset, structures in test.items():
        for reference in structures:
            atoms = reference.copy()
            atoms.calc = calc
            e = abs(atoms.get_potential_energy() - reference.get_potential_energy()) / len(atoms)
            f = np.abs(atoms.get_forces() - reference.get_forces()).ravel()
            s = np.abs(atoms.get_stress(voigt=True) - reference.get_stress(voigt=True)) / units.GPa
            for name in (subset, "all"):
                errors[name]["energy"].append(np.array([e * 1000]))
                errors[name]["forces"].append(f * 1000)
                errors[name]["stress"].append(s)
    return {subset: {key: float(np.mean(np.concatenate(values))) for key, values in by_key.items()}
            for subset, by_key in errors.items()}


def train_exaforce(cfg, root: Path, ranks: int, env: dict[str, str], log: Callable[[str], None]) -> dict:
    """The budgeted run through the real CLI; wall time, steps, structures seen and the model file."""
    from exaforce.perf.runlog import load_run

    path = root / "exaforce.toml"
    write_config(cfg, path)
    log(f"bench accuracy: mpiexec -n {ranks} exaforce train, budget {cfg.run.max_seconds:g} s "
        f"(start-up included), model width {cfg.model.width} (line graph {cfg.model.line_channels}), "
        f"{cfg.model.blocks} blocks, global batch "
        f"{cfg.data.global_batch_size}")
    t0 = time.perf_counter()
    stdout = launch(on_ranks(ranks, exaforce_command("train", "--config", str(path))), "bench accuracy: training",
                    env)
    wall_s = time.perf_counter() - t0
    model_file = Path(stdout.split("; model: ")[-1].split()[0])
    run = load_run(Path(cfg.run.out_dir))
    steps = max(r["step"] for r in run.steps[0])
    structures = sum(r["structures"] for records in run.steps.values() for r in records)
    atoms = sum(r["atoms"] for records in run.steps.values() for r in records)
    peak = max(max(r["peak_mem_bytes"] for r in records) for records in run.steps.values())
    return {"wall_s": wall_s, "steps": steps, "structures_seen": structures, "atoms_per_s": atoms / wall_s,
            "peak_mem_gib_per_rank": peak / 2**30, "model_file": str(model_file)}


def reference_environment(threads: int) -> dict[str, str]:
    """The reference trainer's environment: `threads` threads (the cores exaforce's ranks use) and the
    heap exaforce's own CPU steps keep (run.keep_host_heap), so neither trainer pays this machine's
    page faults on fresh memory that the other does not (MACE-small ran 1.1x faster per epoch with it)."""
    return environment(OMP_NUM_THREADS=str(threads), GLIBC_TUNABLES=KEPT_HEAP_TUNABLES)


def bench_accuracy(budget_s: float, seeds: list[int], config: Path | None, ranks: int, compare: list[str],
                   log: Callable[[str], None], keep: Path | None = None) -> dict:
    from exaforce.calculator import ExaforceCalculator
    from exaforce.config import ConfigError

    if budget_s <= 0:
        raise ConfigError(f"bench accuracy --budget {budget_s}: must be > 0 seconds")
    unknown = set(compare) - {"mace"}
    if unknown:
        raise ConfigError(f"bench accuracy --compare {','.join(sorted(unknown))}: the only reference is mace")
    overrides = read_overrides(config) if config is not None else {}
    try:  # before minutes of data generation
        run_config(overrides, Path("train.bp"), Path("run"), budget_s, seeds[0])
    except ConfigError as exc:
        raise ConfigError(f"{config}: {exc}") from None
    if config is not None:
        log(f"bench accuracy: {config} sets {overrides_text(overrides)}")
    env = environment(OMP_NUM_THREADS="1")
    results = []
    for seed in seeds:
        with tempfile.TemporaryDirectory(prefix="exaforce-bench-accuracy-") as tmp:
            root = Path(tmp)
            log(f"bench accuracy, seed {seed}: {TRAIN_CELLS} training cells, {TEST_CELLS} test cells, "
                f"{MD_FRAMES} Cu3Au MD frames at {MD_TEMPERATURE_K:g} K (EMT) …")
            data, train, test = make_data(root, seed, env)
            cfg = run_config(overrides, data, root / "run", budget_s, seed)
            trained = train_exaforce(cfg, root, ranks, env, log)
            model_file = Path(trained.pop("model_file"))
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(model_file, keep / f"seed-{seed}.pt")
                log(f"  kept the model file as {keep / f'seed-{seed}.pt'}")
            calc = ExaforceCalculator.from_checkpoint(model_file, dtype=cfg.run.dtype)
            results.append({"seed": seed, "model": "exaforce", **trained, "mae": evaluate(calc, test)})
            log(result_line(results[-1]))
            if "mace" in compare:
                from exaforce.bench.accuracy_mace import mace_calculator, train_mace

                trained = train_mace(root, train, budget_s, seed, reference_environment(ranks), log)
                calc = mace_calculator(Path(trained.pop("model_file")))
                results.append({"seed": seed, "model": "mace-small", **trained, "mae": evaluate(calc, test)})
                log(result_line(results[-1]))
    log(table(results))
    return {"budget_s": budget_s, "ranks": ranks, "config": str(config) if config else "project defaults",
            "results": results, "config_resolved": cfg.to_dict()}


def result_line(r: dict) -> str:
    return (f"  seed {r['seed']} {r['model']}: {r['steps']} steps, {r['structures_seen']} structures in "
            f"{r['wall_s']:.0f} s, energy MAE {r['mae']['all']['energy']:.1f} meV/atom, force MAE "
            f"{r['mae']['all']['forces']:.1f} meV/Å ({r['mae']['md']['forces']:.1f} on the MD frames)")


def table(results: list[dict]) -> str:
    lines = ["model       seed  wall s  steps  structs  atoms/s  peak GiB   E MAE meV/atom (all/rand/md)   "
             "F MAE meV/Å (all/rand/md)   S MAE GPa (all)"]
    for r in results:
        mae = r["mae"]
        lines.append(f"{r['model']:11s} {r['seed']:4d}  {r['wall_s']:6.0f}  {r['steps']:5d}  {r['structures_seen']:7d}  "
                     f"{r['atoms_per_s']:7.1f}  {r['peak_mem_gib_per_rank']:8.2f}   "
                     + "/".join(f"{mae[s]['energy']:.1f}" for s in SUBSETS).ljust(31)
                     + "/".join(f"{mae[s]['forces']:.1f}" for s in SUBSETS).ljust(28)
                     + f"{mae['all']['stress']:.3f}")
    return "\n".join(lines)
