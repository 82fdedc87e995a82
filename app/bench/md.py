"""`exaforce bench md`: NVE energy drift through the ASE calculator, a check of smoothness and of
forces being the exact gradient of the energy."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from exaforce.bench import BENCH_SEED


def bench_md(checkpoint_path: str, steps: int, temperature_k: float, dtype: str,
             log: Callable[[str], None]) -> dict:
    """NVE velocity-Verlet on a 108-atom fcc Cu cell (3×3×3 conventional), 1 fs steps, through the
    ASE calculator; reports the total-energy drift per atom."""
    from ase import units
    from ase.build import bulk
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.md.verlet import VelocityVerlet

    from exaforce.calculator import ExaforceCalculator

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 3, 3))
    atoms.calc = ExaforceCalculator.from_checkpoint(checkpoint_path, dtype=dtype)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_k, rng=np.random.default_rng(BENCH_SEED))
    Stationary(atoms)
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    n = len(atoms)
    totals, t0 = [], time.perf_counter()

    def record() -> None:
        totals.append(atoms.get_potential_energy() + atoms.get_kinetic_energy())
        if len(totals) % max(steps // 10, 1) == 1 or len(totals) == steps + 1:
            log(f"  step {len(totals) - 1:>6}/{steps}  E_tot {totals[-1]:.6f} eV  "
                f"T {atoms.get_temperature():6.1f} K  {time.perf_counter() - t0:6.1f} s")

    dyn.attach(record, interval=1)
    record()
    dyn.run(steps)
    totals_arr = np.array(totals[1:]) if len(totals) > steps + 1 else np.array(totals)
    deviation = np.abs(totals_arr - totals_arr[0]) / n
    slope = np.polyfit(np.arange(len(totals_arr)) * 1e-3, totals_arr / n, 1)[0]  # eV/atom per ps
    result = {"atoms": n, "steps": steps, "timestep_fs": 1.0, "temperature_k": temperature_k,
              "max_abs_drift_mev_per_atom": 1e3 * float(deviation.max()),
              "final_drift_mev_per_atom": 1e3 * float((totals_arr[-1] - totals_arr[0]) / n),
              "linear_drift_mev_per_atom_per_ps": 1e3 * float(slope),
              "seconds": time.perf_counter() - t0}
    log(f"NVE {n} atoms, {steps} × 1 fs: max |E_tot(t) − E_tot(0)| = {result['max_abs_drift_mev_per_atom']:.4f} "
        f"meV/atom, final {result['final_drift_mev_per_atom']:+.4f} meV/atom, "
        f"linear fit {result['linear_drift_mev_per_atom_per_ps']:+.4f} meV/atom/ps, {result['seconds']:.0f} s")
    return result
