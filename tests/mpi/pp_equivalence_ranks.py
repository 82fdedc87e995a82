"""Run under `mpiexec -n K script OUT PP DP EP SCHEDULE BLOCK PATH [BACKEND [CHUNKS [ALIVE MICRO]]]`, float64: a training step through a
pp × dp × ep topology (pipeline stages, data-parallel pipelines) equals the single-process step on
the same global batch — energies, forces and stresses (through the pipeline's own phases 1–2),
loss and every parameter gradient. Both run the production `train_step` (lr 0 keeps the weights);
PATH is `plain` (every intermediate stored) or `fused` (the recomputing path); BLOCK is light,
matris or moe (light blocks with element-routed MoE MLPs, experts sharded over ep); CHUNKS stages
per pipeline rank (interleaved); ALIVE parallel.pp_alive (0: chosen) and MICRO the micro-batches per
pipeline (3). Rank 0 writes the comparison as JSON."""

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
from exaforce.model.potential import energy_forces_stress
from exaforce.parallel.parallelize import parallelize
from exaforce.parallel.topology import Topology
from exaforce.training.schedule import make_optimizer
from exaforce.training.step import train_step

from step_reference import DEFAULT_SHAPE, compare_with_serial, rel_diff, seeded_model  # beside this script

GLOBAL_BATCH = 8


def main(out_path: str, pp: int, dp: int, ep: int, schedule: str, block: str, path: str, backend: str = "mpi",
         chunks: str = "1", alive: str = "0", micro_batches: str = "3") -> None:
    topo = Topology.from_mpi(dp=dp, ep=ep, pp=pp)
    run = {"dtype": "float64", "recompute_lines": 0} if path == "plain" else \
        {"dtype": "float64", "recompute_lines": 500, "store_all_below": 0}
    model_table = {"preset": "small-moe", "blocks": 4, "moe_experts": 4} if block == "moe" else \
        {"preset": "small", "blocks": max(4, pp * int(chunks)), "block": block}
    if block != "matris":
        model_table |= DEFAULT_SHAPE
    cfg = from_dict({"data": {"train": ["unused.bp"], "global_batch_size": GLOBAL_BATCH},
                     "model": model_table,
                     "loss": {"moe_aux_weight": 0.1},
                     "parallel": {"dp": dp, "ep": ep, "pp": pp, "pp_schedule": schedule, "pp_chunks": int(chunks),
                                  "pp_alive": int(alive)},
                     "comm": {"bucket_mb": 0.05, "backend": backend}, "run": run})
    frames = Frames.from_atoms(synthesize(GLOBAL_BATCH, seed=11))  # several elements and sizes

    model = seeded_model(cfg, topo.layout.ep_index(topo.rank), ep)
    with torch.no_grad():  # deliberately wrong where the sync must overwrite it (not on a stage's first rank)
        for p in model.parameters() if topo.layout.dp_index(topo.rank) else []:
            p.add_(0.1)
    parallel = parallelize(model, topo, build_groups(backend, topo), cfg)
    optimizer, _ = make_optimizer(model, cfg)

    def batch_of(indices):
        return build_batch(frames.select(np.asarray(indices)), model.species_table(), cfg.model.cutoff,
                           cfg.model.three_body_cutoff).to("cpu", torch.float64)

    # Each pipeline (replica) takes a contiguous share of the global batch, split into micro-batches.
    share = np.array_split(np.arange(GLOBAL_BATCH), topo.layout.replicas)[topo.layout.replica_index(topo.rank)]
    micro = [batch_of(part) for part in np.array_split(share, int(micro_batches))]
    routing = parallel.routing(model, micro[0])  # collective (MoE)
    prediction = parallel.pipeline.predict(micro[0], routing) if parallel.pipeline else None
    step = train_step(model, micro, optimizer, parallel, cfg, topo.layout.replicas / GLOBAL_BATCH, lr=0.0)
    grads = {name: p.grad.numpy().copy() for name, p in model.named_parameters()}
    gathered = topo.gather_to_root({"grads": grads, "stage": topo.stage, "share": share.tolist(),
                                    "prediction": None if prediction is None else
                                    {k: v.detach().numpy() for k, v in prediction.items()},
                                    "times": step.times})

    if topo.rank == 0:  # serial reference: the whole global batch, one process, plain autograd
        serial, diffs, grad_diffs = compare_with_serial(cfg, batch_of(range(GLOBAL_BATCH)), GLOBAL_BATCH, step,
                                                      [g["grads"] for g in gathered])
        predictions = [g["prediction"] for g in gathered if g["prediction"] is not None and g["stage"] == 0]
        if predictions:  # the first stage of the first pipeline: its first micro-batch
            ref = energy_forces_stress(serial, batch_of(gathered[0]["share"][:len(predictions[0]["energy"])]),
                                       training=False)
            for key, value in (("energy", ref.energy_G), ("forces", ref.forces_N3), ("stress", ref.stress_G6)):
                diffs[key] = rel_diff(predictions[0][key], value.detach().numpy())
        worst = max(grad_diffs, key=grad_diffs.get)
        result = {"pp": topo.layout.pp, "dp": topo.layout.dp, "ep": topo.layout.ep, "world": topo.world_size, **diffs,
                  "grad_max_rel_diff": grad_diffs[worst], "worst_param": worst, "params_compared": len(grad_diffs),
                  "params_serial": len(list(serial.parameters())),
                  "stages": sorted({g["stage"] for g in gathered}),
                  "phase_seconds": [{k: v for k, v in g["times"].items() if k.startswith("pp_")} for g in gathered]}
        with open(out_path, "w") as f:
            json.dump(result, f)
    topo.barrier()


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:5]), *sys.argv[5:12])
