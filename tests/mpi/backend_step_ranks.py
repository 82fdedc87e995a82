"""Run under `mpiexec -n K script OUT BACKEND` (K = 2 or 4; ep = 2, dp = K/2), float64.

1. With the reducers armed, computing forces (autograd.grad, create_graph=True) launches no
   gradient reduction; the parameter backward then launches buckets before `finish()`.
2. A training step accumulated over 2 micro-batches equals one step over their union.
3. Rank 0 saves the step's full gradient (experts gathered) as OUT.npz, for cross-backend comparison.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from exaforce.comm.groups import build_groups
from exaforce.config import from_dict
from exaforce.graph import build_batch
from exaforce.io.schema import Frames
from exaforce.io.synth import synthesize
from exaforce.model.potential import Potential, energy, forces_and_stress, strained_geometry
from exaforce.parallel.parallelize import parallelize
from exaforce.parallel.topology import Topology
from exaforce.training.step import train_step

GLOBAL_BATCH = 8


def main(out_path: str, backend: str) -> None:
    topo = Topology.from_mpi(ep=2)
    cfg = from_dict({"data": {"train": ["unused.bp"], "global_batch_size": GLOBAL_BATCH},
                     "model": {"preset": "small-moe", "moe_experts": 4, "moe_top_k": 2},
                     "optim": {"grad_clip": 0.0}, "parallel": {"ep": 2}, "run": {"dtype": "float64"},
                     "comm": {"backend": backend, "bucket_mb": 0.05}})
    frames = Frames.from_atoms(synthesize(GLOBAL_BATCH, seed=12))
    torch.manual_seed(3)
    model = Potential(cfg.model, topo.layout.ep_index(topo.rank), 2).double()
    parallel = parallelize(model, topo, build_groups(backend, topo), cfg)
    reduction = parallel.reduction
    share = np.array_split(np.arange(GLOBAL_BATCH), topo.world_size)[topo.rank]

    def batch_of(indices):
        return build_batch(frames.select(np.asarray(indices)), model.species_table(), cfg.model.cutoff,
                           cfg.model.three_body_cutoff).to("cpu", torch.float64)

    # 1. Forces trigger no reduction; the parameter backward does (overlap).
    batch = batch_of(share)
    routing = parallel.routing(model, batch)
    reduction.arm()
    geometry = strained_geometry(batch)
    pred = forces_and_stress(energy(model, batch, geometry, routing), geometry, batch, training=True)
    launches_after_forces = reduction.launches
    (pred.forces_N3.pow(2).sum() + pred.energy_G.sum()).backward()
    launches_after_backward = reduction.launches
    reduction.finish(model)
    model.zero_grad(set_to_none=True)

    # 2. One step over the union == the same step over 2 micro-batches (SGD with lr 0 keeps the weights).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scale = topo.world_size / GLOBAL_BATCH

    def step_grads(micro: list) -> tuple[dict[str, np.ndarray], float]:
        sums = train_step(model, micro, optimizer, parallel, cfg, scale, 0.0).loss_sums
        return {n: p.grad.numpy().copy() for n, p in model.named_parameters()}, sums["total"]

    union, loss_union = step_grads([batch])
    halves, loss_halves = step_grads([batch_of(part) for part in np.array_split(share, 2)])
    micro_rel = max(float(np.abs(union[n] - halves[n]).max() / max(np.abs(union[n]).max(), 1e-300)) for n in union)
    micro_rel = topo.max(micro_rel)

    gathered = topo.gather_to_root(union)
    if topo.rank == 0:
        full = {}
        for grads in gathered:
            full.update(grads)
        np.savez(out_path + ".npz", **full)
        with open(out_path, "w") as f:
            json.dump({"backend": backend, "world": topo.world_size, "launches_after_forces": launches_after_forces,
                       "launches_after_backward": launches_after_backward, "buckets": [len(r.buckets) for r in reduction.reducers],
                       "micro_batch_max_rel_diff": micro_rel, "loss_union": loss_union, "loss_halves": loss_halves,
                       "n_params": len(full)}, f)
    topo.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
