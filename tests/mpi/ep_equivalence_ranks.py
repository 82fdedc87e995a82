"""Run under `mpiexec -n K script OUT DP EP [BACKEND]`, float64: an MoE training step on a dp × ep topology
equals the single-process step on the same global batch — energies, forces, stresses, loss, the
aux loss and every parameter gradient (dense and expert). Both run the production `train_step`
(lr 0 keeps the weights). Rank 0 writes the comparison as JSON."""

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
from exaforce.model.potential import Potential, energy_forces_stress
from exaforce.model.routing import expert_load
from exaforce.parallel.parallelize import parallelize
from exaforce.parallel.topology import Topology
from exaforce.training.schedule import make_optimizer
from exaforce.training.step import train_step

GLOBAL_BATCH = 8


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.nan_to_num(np.asarray(a)), np.nan_to_num(np.asarray(b))
    return float(np.abs(a - b).max(initial=0.0) / max(np.abs(b).max(initial=0.0), 1e-300))


# An uneven, non-contiguous placement of the 8 experts (every rank holds at least one).
SCATTERED = {1: [0] * 8, 2: [1, 0, 0, 0, 1, 0, 0, 1], 4: [3, 0, 2, 0, 1, 3, 0, 3]}


def main(out_path: str, dp: int, ep: int, backend: str, placement: str) -> None:
    topo = Topology.from_mpi(dp=dp, ep=ep)
    cfg = from_dict({"data": {"train": ["unused.bp"], "global_batch_size": GLOBAL_BATCH},
                     "model": {"preset": "small-moe", "moe_experts": 8, "moe_top_k": 2},
                     "loss": {"moe_aux_weight": 0.1}, "parallel": {"dp": dp, "ep": ep},
                     "comm": {"backend": backend, "bucket_mb": 0.05},  # several buckets
                     # distributed: fused attentions over many chunks, line-attention sums stored (the
                     # dp test covers the bonds-recomputed default)
                     "run": {"dtype": "float64", "recompute_lines": 50, "recompute_bonds": False,
                             "store_all_below": 0}})
    stored_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, recompute_lines=0))  # serial: stored
    frames = Frames.from_atoms(synthesize(GLOBAL_BATCH, seed=11))  # several elements and sizes
    dp_index, ep_index = topo.layout.dp_index(topo.rank), topo.layout.ep_index(topo.rank)

    def build(ep_rank: int, ep_size: int) -> Potential:
        torch.manual_seed(5)
        model = Potential(cfg.model, ep_rank, ep_size).double()
        if placement == "scattered" and ep_size > 1:
            for layer in model.moe_layers:
                layer.place_initial(np.array(SCATTERED[ep_size]))
        with torch.no_grad():
            model.energy_scale_H.fill_(0.5)
        return model

    model = build(ep_index, ep)
    with torch.no_grad():  # deliberately wrong where the sync must overwrite it
        for p in model.dense_parameters() if topo.rank else []:
            p.add_(0.1)
        for p in model.expert_parameters() if dp_index else []:
            p.add_(0.1)
    parallel = parallelize(model, topo, build_groups(backend, topo), cfg)  # must overwrite the wrong start
    optimizer, _ = make_optimizer(model, cfg)

    def batch_of(indices):
        return build_batch(frames.select(np.asarray(indices)), model.species_table(), cfg.model.cutoff,
                           cfg.model.three_body_cutoff).to("cpu", torch.float64)

    # Distributed: rank r takes a contiguous share of the global batch.
    batch = batch_of(np.array_split(np.arange(GLOBAL_BATCH), topo.world_size)[topo.rank])
    pred = energy_forces_stress(model, batch, training=False, routing=parallel.routing(model, batch))
    step = train_step(model, [batch], optimizer, parallel, cfg, topo.world_size / GLOBAL_BATCH, lr=0.0)
    grads = {name: p.grad.numpy().copy() for name, p in model.named_parameters()}
    gathered = topo.gather_to_root({"energy": pred.energy_G.detach().numpy(), "forces": pred.forces_N3.detach().numpy(),
                                    "stress": pred.stress_G6.detach().numpy(), "grads": grads,
                                    "alltoall_calls": step.routings[-1].clock.calls,
                                    "load": expert_load(step.routings)})

    if topo.rank == 0:  # serial reference: the whole global batch, every expert, one process
        serial = build(0, 1)
        solo = Topology.single_process()
        serial_parallel = parallelize(serial, solo, build_groups(backend, solo), cfg)
        serial_optimizer, _ = make_optimizer(serial, cfg)
        whole = batch_of(range(GLOBAL_BATCH))
        ref = energy_forces_stress(serial, whole, training=False)
        ref_step = train_step(serial, [whole], serial_optimizer, serial_parallel, stored_cfg, 1.0 / GLOBAL_BATCH,
                              lr=0.0)
        ref_losses = ref_step.loss_sums
        diffs = {
            "energy": rel_diff(np.concatenate([g["energy"] for g in gathered]), ref.energy_G.detach().numpy()),
            "forces": rel_diff(np.concatenate([g["forces"] for g in gathered]), ref.forces_N3.detach().numpy()),
            "stress": rel_diff(np.concatenate([g["stress"] for g in gathered]), ref.stress_G6.detach().numpy()),
            "loss": rel_diff(step.loss, ref_step.loss),
            "moe_aux": rel_diff(step.loss_sums["moe_aux"], ref_losses["moe_aux"]),
        }
        grad_diffs, compared = {}, set()
        for rank_result in gathered:  # every rank's copy of every parameter it holds
            for name, grad in rank_result["grads"].items():
                serial_grad = dict(serial.named_parameters())[name].grad.numpy()
                grad_diffs[name] = max(grad_diffs.get(name, 0.0), rel_diff(grad, serial_grad))
                compared.add(name)
        worst = max(grad_diffs, key=grad_diffs.get)
        result = {"dp": topo.layout.dp, "ep": topo.layout.ep, "world": topo.world_size, "backend": backend, **diffs,
                  "grad_max_rel_diff": grad_diffs[worst], "worst_param": worst,
                  "params_compared": len(compared), "params_serial": len(list(serial.parameters())),
                  "expert_params_serial": len(serial.expert_parameters()),
                  "alltoall_calls": [g["alltoall_calls"] for g in gathered],
                  "loads": [g["load"] for g in gathered], "serial_load": expert_load(ref_step.routings),
                  "moe_aux_value": ref_losses["moe_aux"], "loss_value": ref_step.loss}
        with open(out_path, "w") as f:
            json.dump(result, f)
    topo.barrier()


if __name__ == "__main__":
    backend = sys.argv[4] if len(sys.argv) > 4 else "mpi"
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), backend, sys.argv[5] if len(sys.argv) > 5 else "contiguous")
