"""Run under `mpiexec -n K`: the world-averaged gradient of a data-parallel step equals the
single-process gradient of the same global batch (float64). Both go through the production
`train_step` (reduction, clipping, optimizer; lr 0 keeps the weights). Rank 0 writes the comparison as JSON."""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import torch

from exaforce.comm.groups import build_groups
from exaforce.config import from_dict
from exaforce.graph import build_batch
from exaforce.io.schema import Frames
from exaforce.io.synth import synthesize
from exaforce.model.potential import Potential
from exaforce.parallel.parallelize import parallelize
from exaforce.parallel.topology import Topology
from exaforce.training.schedule import make_optimizer
from exaforce.training.step import train_step

GLOBAL_BATCH = 6


def main(out_path: str) -> None:
    topo = Topology.from_mpi()
    cfg = from_dict({"data": {"train": ["unused.bp"], "global_batch_size": GLOBAL_BATCH},
                     "model": {"width": 16, "blocks": 2},
                     "run": {"dtype": "float64", "recompute_lines": 50,  # distributed: recomputed, many chunks
                             "store_all_below": 0}})
    stored_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, recompute_lines=0))  # serial: stored
    frames = Frames.from_atoms(synthesize(GLOBAL_BATCH, seed=11))  # structures of different sizes
    torch.manual_seed(topo.rank)  # deliberately different per rank: parallelize's broadcast must fix it
    model = Potential(cfg.model).double()
    with torch.no_grad():
        model.energy_scale_H.fill_(0.5)
    parallel = parallelize(model, topo, build_groups(cfg.comm.backend, topo), cfg)
    optimizer, _ = make_optimizer(model, cfg)

    def batch_of(indices) -> object:
        return build_batch(frames.select(np.asarray(indices)), model.species_table(), cfg.model.cutoff,
                           cfg.model.three_body_cutoff).to("cpu", torch.float64)

    # Distributed: rank r takes a contiguous share of the global batch.
    share = np.array_split(np.arange(GLOBAL_BATCH), topo.world_size)[topo.rank]
    result = train_step(model, [batch_of(share)], optimizer, parallel, cfg, topo.world_size / GLOBAL_BATCH, lr=0.0)
    distributed = [p.grad.clone() for p in model.parameters()]

    # Serial reference on rank 0: the whole global batch in one process, the same weights (lr 0).
    if topo.rank == 0:
        solo = Topology.single_process()
        serial_parallel = parallelize(model, solo, build_groups(cfg.comm.backend, solo), cfg)
        serial_result = train_step(model, [batch_of(range(GLOBAL_BATCH))], optimizer, serial_parallel, stored_cfg,
                                   1.0 / GLOBAL_BATCH, lr=0.0)
        serial = [p.grad for p in model.parameters()]
        rel = max(float((d - s).norm() / s.norm()) for d, s in zip(distributed, serial) if s.norm() > 0)
        out = {"world_size": topo.world_size, "max_rel_grad_diff": rel,
               "loss_distributed": result.loss, "loss_serial": serial_result.loss,
               "grad_norm": float(sum(s.norm() ** 2 for s in serial) ** 0.5), "n_params": len(serial)}
        with open(out_path, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1])
