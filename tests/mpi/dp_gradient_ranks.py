"""Run under `mpiexec -n K`: the world-averaged gradient of a data-parallel step equals the
single-process gradient of the same global batch (float64). Rank 0 writes the comparison as JSON."""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from exaforce.config import from_dict
from exaforce.io.schema import Frames
from exaforce.io.synth import synthesize
from exaforce.model.graph import build_batch
from exaforce.model.potential import Potential
from exaforce.parallel import GradientReduction, sync_initial_parameters
from exaforce.topology import Topology
from exaforce.train import loss_and_gradients

GLOBAL_BATCH = 6


def main(out_path: str) -> None:
    topo = Topology.from_mpi()
    cfg = from_dict({"data": {"train": ["unused.bp"], "global_batch_size": GLOBAL_BATCH},
                     "model": {"width": 16, "blocks": 2}, "run": {"dtype": "float64"}})
    frames = Frames.from_atoms(synthesize(GLOBAL_BATCH, seed=11))  # structures of different sizes
    torch.manual_seed(topo.rank)  # deliberately different per rank: the broadcast must fix it
    model = Potential(cfg.model).double()
    with torch.no_grad():
        model.energy_scale_H.fill_(0.5)
    sync_initial_parameters(model, topo)

    def batch_of(indices) -> object:
        return build_batch(frames.select(np.asarray(indices)), model.species_table(), cfg.model.cutoff,
                           cfg.model.three_body_cutoff).to("cpu", torch.float64)

    # Distributed: rank r takes a contiguous share of the global batch.
    share = np.array_split(np.arange(GLOBAL_BATCH), topo.world_size)[topo.rank]
    loss_sums = loss_and_gradients(model, batch_of(share), cfg, topo.world_size / GLOBAL_BATCH, {})
    GradientReduction(model, topo).finish()
    distributed = [p.grad.clone() for p in model.parameters()]
    total_loss = topo.world.allreduce(loss_sums["total"]) / GLOBAL_BATCH

    # Serial reference on rank 0: the whole global batch in one process.
    if topo.rank == 0:
        model.zero_grad(set_to_none=True)
        serial_loss = loss_and_gradients(model, batch_of(range(GLOBAL_BATCH)), cfg, 1.0 / GLOBAL_BATCH, {})
        serial = [p.grad for p in model.parameters()]
        rel = max(float((d - s).norm() / s.norm()) for d, s in zip(distributed, serial) if s.norm() > 0)
        result = {"world_size": topo.world_size, "max_rel_grad_diff": rel,
                  "loss_distributed": total_loss, "loss_serial": serial_loss["total"] / GLOBAL_BATCH,
                  "grad_norm": float(sum(s.norm() ** 2 for s in serial) ** 0.5), "n_params": len(serial)}
        with open(out_path, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
