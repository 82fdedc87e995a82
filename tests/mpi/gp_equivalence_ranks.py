"""Run under `mpiexec -n K script OUT GP DP EP MIN_ATOMS BLOCK PATH [BACKEND [HALO]]`, float64: a training step with each
structure's atoms split over a GP group (× dp replicas × ep expert shards) equals the single-process
step on the same global batch — energies, forces and stresses (GraphParallel.predict), loss and every
parameter gradient. Both run the production `train_step` (lr 0 keeps the weights). The batch holds
triclinic cells, a rod long enough that a domain's one-hop halo is only part of it, a slab (periodic in
two directions), a three-atom cluster (at gp = 4 one rank owns
none of it) and synthesized EMT cells; structures of at least MIN_ATOMS atoms are split, smaller ones
go whole to one GP rank (MIN_ATOMS = 1000: no structure is split, and some rank owns no atom of
some micro-batch). HALO: ghost (default) or exchange (parallel.gp_halo). Rank 0 writes the comparison as JSON."""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk, fcc111
from ase.calculators.singlepoint import SinglePointCalculator

from exaforce.comm.groups import build_groups
from exaforce.config import from_dict
from exaforce.graph import build_batch
from exaforce.io.schema import Frames
from exaforce.io.synth import synthesize
from exaforce.model.potential import energy_forces_stress
from exaforce.parallel.parallelize import parallelize
from exaforce.parallel.topology import Topology
from exaforce.training.schedule import make_optimizer
from exaforce.training.step import train_step

from step_reference import DEFAULT_SHAPE, compare_with_serial, rel_diff, seeded_model  # beside this script

MICRO_BATCHES = 3  # at gp = 4 without splitting, the first (3 structures) leaves a rank empty


def structures() -> list[Atoms]:
    """Triclinic alloy cells, a slab and a cluster, with random labels (the loss only needs numbers)."""
    rng = np.random.default_rng(7)
    out = []
    for shear in (0.12, -0.08):
        cell = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((3, 2, 2))
        cell.numbers[rng.choice(len(cell), 14, replace=False)] = 79
        cell.set_cell(cell.cell.array @ np.array([[1, shear, 0.05], [0, 1, 0.1], [0.03, 0, 1]]), scale_atoms=True)
        cell.rattle(0.08, seed=len(out))
        out.append(cell)
    rod = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 10))  # 36 Å long: halves and quarters whose one-hop
    rod.numbers[::5] = 79                                           # halo (6 Å each way) is a part of the cell
    rod.rattle(0.06, seed=5)
    out.append(rod)
    slab = fcc111("Ni", size=(3, 3, 3), vacuum=5.0, periodic=True)
    slab.pbc = (True, True, False)
    slab.numbers[::4] = 29
    slab.rattle(0.05, seed=2)
    out += [slab, Atoms("Cu2Au", positions=[[0, 0, 0], [2.4, 0, 0], [1.2, 2.0, 0.3]])]
    for atoms in out:
        stress = rng.normal(size=6) * 0.01 if atoms.pbc.all() else None
        atoms.calc = SinglePointCalculator(atoms, energy=float(rng.normal() * 3 - 3.5 * len(atoms)),
                                           forces=rng.normal(size=(len(atoms), 3)), stress=stress)
    return out + synthesize(4, seed=11)


def main(out_path: str, gp: int, dp: int, ep: int, min_atoms: int, block: str, path: str, backend: str = "mpi",
         halo: str = "ghost") -> None:
    topo = Topology.from_mpi(dp=dp, ep=ep, gp=gp)
    run = {"dtype": "float64", "recompute_lines": 0} if path == "plain" else \
        {"dtype": "float64", "recompute_lines": 500, "store_all_below": 0}
    atoms = structures()
    model_table = {"preset": "small-moe", "blocks": 3, "moe_experts": 4} if block == "moe" else \
        {"preset": "small", "blocks": 3, "block": block}
    if block != "matris":
        model_table |= DEFAULT_SHAPE
    cfg = from_dict({"data": {"train": ["unused.bp"], "global_batch_size": len(atoms)},
                     "model": model_table,
                     "loss": {"moe_aux_weight": 0.1},
                     "parallel": {"dp": dp, "ep": ep, "gp": gp, "gp_min_atoms": min_atoms, "gp_halo": halo},
                     "comm": {"bucket_mb": 0.05, "backend": backend}, "run": run})
    frames = Frames.from_atoms(atoms)

    model = seeded_model(cfg, topo.layout.ep_index(topo.rank), ep)
    parallel = parallelize(model, topo, build_groups(backend, topo), cfg)
    parallel.graph.weights = {"atoms": 1.0, "edges": 0.02, "angles": 0.002}
    optimizer, _ = make_optimizer(model, cfg)

    def batch_of(indices):
        return build_batch(frames.select(np.asarray(indices)), model.species_table(), cfg.model.cutoff,
                           cfg.model.three_body_cutoff).to("cpu", torch.float64)

    # Each replica takes a contiguous share of the global batch; its GP ranks split every structure.
    share = np.array_split(np.arange(len(atoms)), topo.layout.replicas)[topo.layout.replica_index(topo.rank)]
    micro = [batch_of(part) for part in np.array_split(share, MICRO_BATCHES)]
    first = parallel.graph.shard(micro[0])
    prediction = parallel.graph.predict(model, first, parallel.routing(model, first.local, first.owned_2C))
    step = train_step(model, micro, optimizer, parallel, cfg, topo.layout.replicas / len(atoms), lr=0.0)
    grads = {name: p.grad.numpy().copy() for name, p in model.named_parameters()}
    owned = [len(parallel.graph.shard(b).owned_n) for b in micro]  # atoms this rank owns in each micro-batch
    gathered = topo.gather_to_root({"grads": grads, "share": share.tolist(), "owned": owned,
                                    "local_atoms": int(first.local.numbers_N.shape[0]),
                                    "prediction": {k: getattr(prediction, k).numpy()
                                                   for k in ("energy_G", "forces_N3", "stress_G6")},
                                    "times": step.times})

    if topo.rank == 0:  # serial reference: the whole global batch, one process, plain autograd
        serial, diffs, grad_diffs = compare_with_serial(cfg, batch_of(range(len(atoms))), len(atoms), step,
                                                      [g["grads"] for g in gathered])
        for key in ("energy_G", "forces_N3", "stress_G6"):
            diffs[key] = 0.0
        for g in gathered:  # every rank's prediction of its replica's first micro-batch
            ref = energy_forces_stress(serial, batch_of(np.array_split(g["share"], MICRO_BATCHES)[0]), training=False)
            for key in ("energy_G", "forces_N3", "stress_G6"):
                diffs[key] = max(diffs[key], rel_diff(g["prediction"][key], getattr(ref, key).detach().numpy()))
        worst = max(grad_diffs, key=grad_diffs.get)
        result = {"gp": topo.layout.gp, "dp": topo.layout.dp, "ep": topo.layout.ep, "world": topo.world_size,
                  **diffs, "grad_max_rel_diff": grad_diffs[worst], "worst_param": worst,
                  "params_compared": len(grad_diffs), "params_serial": len(list(serial.parameters())),
                  "owned": [g["owned"] for g in gathered], "local_atoms": [g["local_atoms"] for g in gathered],
                  "gp_sum_seconds": [g["times"].get("gp_sum", 0.0) for g in gathered],
                  "gp_halo_seconds": [g["times"].get("gp_halo", 0.0) for g in gathered]}
        with open(out_path, "w") as f:
            json.dump(result, f)
    topo.barrier()


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:6]), *sys.argv[6:10])
