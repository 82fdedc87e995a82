"""Run under `mpiexec -n K script OUT GRAPH_PARALLEL STEPS`: NVE molecular dynamics (velocity Verlet,
1 fs, float64, 600 K) of a rattled 108-atom Cu3Au cell through the ASE calculator (the small preset, seeded
weights), with the cell's atoms split over the K ranks (GRAPH_PARALLEL = ghost or exchange: the halo;
exchange-lean: the exchange with the large-cell inference path, fused attentions and the geometry features
recomputed in units of 2,000 triplets, forced for this small cell) or on one rank (0). Rank 0
writes the first forces and every step's potential and total energy as JSON."""

from __future__ import annotations

import json
import sys

import numpy as np
from ase import units
from ase.build import bulk
from ase.md.verlet import VelocityVerlet

import exaforce.model.potential as potential_module
from exaforce.calculator import ExaforceCalculator


def main(out_path: str, graph_parallel: str, steps: str) -> None:
    atoms = bulk("Cu", "fcc", a=3.75, cubic=True).repeat((3, 3, 3))
    atoms.numbers[::4] = 79
    atoms.rattle(0.05, seed=1)
    sigma = np.sqrt(600 * units.kB / atoms.get_masses())[:, None]  # 600 K, every rank alike
    atoms.set_momenta(atoms.get_masses()[:, None] * sigma * np.random.default_rng(2).normal(size=(len(atoms), 3)))
    if graph_parallel == "exchange-lean":
        graph_parallel = "exchange"
        potential_module.LEAN_INFERENCE_ABOVE, potential_module.INFERENCE_GEOMETRY_LINES = 0, 2000
    atoms.calc = ExaforceCalculator.from_preset("small", seed=0, graph_parallel=False if graph_parallel == "0" else graph_parallel)
    atoms.calc.model.energy_scale_H.fill_(1000.0)  # random weights: forces of a metal's size (~0.5 eV/Å)
    forces = atoms.get_forces()
    potential, total = [], []

    def record() -> None:
        potential.append(atoms.get_potential_energy())
        total.append(atoms.get_potential_energy() + atoms.get_kinetic_energy())

    dynamics = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    dynamics.attach(record, interval=1)
    dynamics.run(int(steps))
    calc = atoms.calc
    rank = calc.graph.topo.rank if calc.graph is not None else 0
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"forces": forces.tolist(), "potential": potential, "total": total,
                       "ranks": calc.graph.topo.world_size if calc.graph is not None else 1}, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
