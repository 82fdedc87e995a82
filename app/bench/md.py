"""`exaforce bench md`: molecular dynamics through the ASE calculator with a trained model.

Two checks a user of the potential cares about: a hot Langevin run stays physical (no atoms
collapse onto each other, the thermostat holds the temperature: a potential with holes or
unsmooth forces fails here first), and NVE conserves energy (forces are the exact gradient of a
smooth energy)."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from exaforce.bench import BENCH_SEED

CLOSE_CONTACT_A = 1.5           # Å: no Cu-Cu pair in a physical melt or solid comes this close (the dimer is 2.2 Å)
TEMPERATURE_TOLERANCE = 0.15    # the Langevin run's mean temperature (second half) within 15 % of the target
SAMPLE_EVERY = 10               # steps between samples of distances and temperature


def bench_md(checkpoint_path: str, steps: int, temperature_k: float, dtype: str, log: Callable[[str], None],
             langevin_steps: int = 0, timestep_fs: float = 1.0, nve_timestep_fs: float | None = None,
             cells: tuple[int, int, int] = (3, 3, 3), graph_parallel: bool | str = False) -> dict | None:
    """An fcc Cu cell (`cells` conventional cells; default 3×3×3, 108 atoms): `langevin_steps` of
    Langevin at `temperature_k` (if any), then `steps` of NVE velocity-Verlet from there (else from
    Maxwell-Boltzmann velocities), at `nve_timestep_fs` (default: the Langevin's). graph_parallel: run
    under `mpiexec -n K`, the cell's atoms split over the K ranks (every rank runs the same dynamics;
    rank 0 logs and returns the result, the others None); the halo: "auto" (True), "exchange" or
    "ghost" (exaforce.calculator)."""
    from ase.build import bulk
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

    from exaforce.calculator import ExaforceCalculator

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(cells)
    atoms.calc = ExaforceCalculator.from_checkpoint(checkpoint_path, dtype=dtype, graph_parallel=graph_parallel)
    graph = atoms.calc.graph
    root = graph is None or graph.topo.is_root
    if not root:
        log = _quiet
    if graph is not None:
        log(f"bench md: {len(atoms)} atoms split over {graph.topo.world_size} ranks (graph parallelism, {graph.halo} halo)")
    rng = np.random.default_rng(BENCH_SEED)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_k, rng=rng)
    Stationary(atoms)
    result: dict = {"atoms": len(atoms), "timestep_fs": timestep_fs, "temperature_k": temperature_k}
    if langevin_steps:
        result["langevin"] = langevin(atoms, langevin_steps, temperature_k, timestep_fs, rng, log)
    result["nve"] = nve(atoms, steps, nve_timestep_fs or timestep_fs, log)
    result["ranks"] = 1 if graph is None else graph.topo.world_size
    result["halo"] = None if graph is None else graph.halo
    return result if root else None


def _quiet(message: str) -> None:
    """The log of a rank other than 0 under graph parallelism."""


def langevin(atoms, steps: int, temperature_k: float, timestep_fs: float, rng: np.random.Generator,
             log: Callable[[str], None]) -> dict:
    from ase import units
    from ase.md.langevin import Langevin

    dynamics = Langevin(atoms, timestep_fs * units.fs, temperature_K=temperature_k, friction=0.01 / units.fs,
                        fixcm=False, rng=rng)
    temperatures, closest, t0 = [], [], time.perf_counter()

    def sample() -> None:
        distances = atoms.get_all_distances(mic=True)
        closest.append(float(distances[np.triu_indices(len(atoms), 1)].min()))
        temperatures.append(atoms.get_temperature())
        done = len(temperatures) * SAMPLE_EVERY
        if len(temperatures) % max(steps // SAMPLE_EVERY // 10, 1) == 0:
            log(f"  langevin {done:>6}/{steps}  T {temperatures[-1]:7.1f} K  closest pair {closest[-1]:.3f} Å  "
                f"{time.perf_counter() - t0:6.0f} s")

    dynamics.attach(sample, interval=SAMPLE_EVERY)
    dynamics.run(steps)
    settled = np.array(temperatures[len(temperatures) // 2:])
    result = {"steps": steps, "ps": steps * timestep_fs / 1e3, "closest_pair_a": min(closest),
              "mean_temperature_k": float(settled.mean()), "std_temperature_k": float(settled.std()),
              "seconds": time.perf_counter() - t0}
    result["physical"] = bool(result["closest_pair_a"] >= CLOSE_CONTACT_A and
                              abs(result["mean_temperature_k"] / temperature_k - 1) <= TEMPERATURE_TOLERANCE)
    log(f"Langevin {len(atoms)} atoms, {result['ps']:g} ps at {temperature_k:g} K: closest pair "
        f"{result['closest_pair_a']:.3f} Å (limit {CLOSE_CONTACT_A} Å), mean T of the second half "
        f"{result['mean_temperature_k']:.1f} ± {result['std_temperature_k']:.1f} K (limit ±"
        f"{100 * TEMPERATURE_TOLERANCE:.0f} %): {'physical' if result['physical'] else 'NOT physical'}, "
        f"{result['seconds']:.0f} s")
    return result


def nve(atoms, steps: int, timestep_fs: float, log: Callable[[str], None]) -> dict:
    from ase import units
    from ase.md.verlet import VelocityVerlet

    dynamics = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    n = len(atoms)
    totals, t0 = [], time.perf_counter()

    def record() -> None:
        totals.append(atoms.get_potential_energy() + atoms.get_kinetic_energy())
        if len(totals) % max(steps // 10, 1) == 1 or len(totals) == steps + 1:
            log(f"  nve {len(totals) - 1:>6}/{steps}  E_tot {totals[-1]:.6f} eV  "
                f"T {atoms.get_temperature():6.1f} K  {time.perf_counter() - t0:6.1f} s")

    dynamics.attach(record, interval=1)
    dynamics.run(steps)
    totals_arr = np.array(totals)
    deviation = np.abs(totals_arr - totals_arr[0]) / n
    slope = np.polyfit(np.arange(len(totals_arr)) * timestep_fs * 1e-3, totals_arr / n, 1)[0]  # eV/atom per ps
    result = {"steps": steps, "timestep_fs": timestep_fs, "max_abs_drift_mev_per_atom": 1e3 * float(deviation.max()),
              "final_drift_mev_per_atom": 1e3 * float((totals_arr[-1] - totals_arr[0]) / n),
              "linear_drift_mev_per_atom_per_ps": 1e3 * float(slope),
              "seconds": time.perf_counter() - t0}
    log(f"NVE {n} atoms, {steps} × {timestep_fs:g} fs: max |E_tot(t) − E_tot(0)| = "
        f"{result['max_abs_drift_mev_per_atom']:.4f} meV/atom, final {result['final_drift_mev_per_atom']:+.4f} "
        f"meV/atom, linear fit {result['linear_drift_mev_per_atom_per_ps']:+.4f} meV/atom/ps, "
        f"{result['seconds']:.0f} s")
    return result
