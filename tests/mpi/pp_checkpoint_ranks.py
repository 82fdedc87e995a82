"""Run under `mpiexec -n K script OUT CONFIG CHECKPOINT DATA`: the pipeline of CONFIG (parallel.pp = K
stages) restored from checkpoint folder CHECKPOINT by `checkpoint.restore` (each stage takes its own
part) predicts the energies and forces of every structure of DATA in one batch (float64, through
`PipelineStage.predict`). Rank 0, the first stage, writes them as JSON."""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from exaforce import checkpoint
from exaforce.comm.groups import build_groups
from exaforce.config import load
from exaforce.graph import build_batch
from exaforce.io.bp import open_bp
from exaforce.model.potential import Potential
from exaforce.parallel.parallelize import parallelize
from exaforce.parallel.topology import Topology
from exaforce.training.schedule import make_optimizer


def main(out_path: str, config_path: str, folder: str, data: str) -> None:
    cfg = load(config_path)
    topo = Topology.from_mpi(pp=cfg.parallel.pp)
    model = Potential(cfg.model).double()
    parallel = parallelize(model, topo, build_groups("mpi", topo), cfg)
    optimizer, _ = make_optimizer(model, cfg)
    checkpoint.restore(folder, model, optimizer, topo, lambda message: None)  # collective
    with open_bp(data) as dataset:
        frames = dataset.read(0, dataset.n_structures)
    batch = build_batch(frames, model.species_table(), cfg.model.cutoff, cfg.model.three_body_cutoff).to(
        "cpu", torch.float64)
    pred = parallel.pipeline.predict(batch, parallel.routing(model, batch))  # collective over the pipeline
    if topo.is_root:
        with open(out_path, "w") as f:
            json.dump({"stages": topo.layout.pp, "energy": pred["energy"].detach().numpy().tolist(),
                       "forces": pred["forces"].detach().numpy().tolist(),
                       "params_on_stage": int(sum(np.prod(p.shape) for p in model.parameters()))}, f)
    topo.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:5])
