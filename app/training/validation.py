"""Validation metrics on the held-out structures, per head, computed by all ranks together.

Every rank takes the same number of chunks (so MoE collectives line up), each chunk dealt by cost
like a training step; a rank with nothing left in a chunk runs its first structure again with
weight 0. Errors are summed locally and all-reduced once: energy MAE per atom and force MAE per
component, in meV/atom and meV/Å. With pipeline stages a chunk is dealt to the pipelines, each
predicts its share through its stages (PipelineStage.predict), and the first stage, which holds the
predictions, adds the errors; with graph parallelism a GP group predicts its share together
(GraphParallel.predict) and its first rank adds the errors.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from exaforce.graph import GraphBatch
from exaforce.io.sampler import deal
from exaforce.model.potential import Potential, energy_forces_stress
from exaforce.parallel.parallelize import Parallel
from exaforce.training.data import GlobalIndex


def validation_mae(model: Potential, index: GlobalIndex, to_batch: Callable[[np.ndarray], GraphBatch],
                   cost_G: np.ndarray, chunk: int, parallel: Parallel) -> dict[str, dict[str, float]]:
    """{head: {"energy_mev_per_atom", "forces_mev_per_a", "structures"}} over the validation split (collective)."""
    topo, replicas = parallel.topo, parallel.topo.layout.replicas
    val = np.flatnonzero(index.is_val_G)
    heads = model.cfg.heads
    sums = np.zeros((len(heads), 4))  # Σ|ΔE|/atoms, structures, Σ|ΔF|, force components
    if len(val):
        per_chunk = chunk * replicas
        for c in range(math.ceil(len(val) / per_chunk)):
            part = val[c * per_chunk:(c + 1) * per_chunk]
            share = deal(part, cost_G[part], replicas)[topo.layout.replica_index(topo.rank)]
            batch = to_batch(share if len(share) else val[:1])
            pred = _energy_and_forces(model, batch, parallel)  # collective with pipeline stages
            if pred is None:  # a later stage or GP rank: the first one holds the predictions
                continue
            weight = 1.0 if len(share) else 0.0
            energy_G, forces_N3 = pred
            with torch.no_grad():
                head_G = batch.head_G.cpu().numpy()  # errors on the device, the sums on the host
                e_err = ((energy_G - batch.energy_G).abs() / batch.natoms_G).cpu().numpy()
                f_err_N = (forces_N3 - batch.forces_N3).abs().sum(-1).cpu().numpy()
                f_err_G = np.bincount(batch.graph_N.cpu().numpy(), f_err_N, minlength=batch.n_graphs)
                natoms_G = batch.natoms_G.cpu().numpy()
                for h in range(len(heads)):
                    mine = head_G == h
                    sums[h] += weight * np.array([e_err[mine].sum(), mine.sum(), f_err_G[mine].sum(),
                                                  3 * natoms_G[mine].sum()])
    sums = topo.sum(sums)  # collective
    return {head: {"energy_mev_per_atom": 1e3 * s[0] / s[1], "forces_mev_per_a": 1e3 * s[2] / s[3],
                   "structures": int(s[1])} for head, s in zip(heads, sums) if s[1] > 0}


def _energy_and_forces(model: Potential, batch: GraphBatch,
                       parallel: Parallel) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Energies and forces of `batch` on this rank, or through the pipeline (collective over its
    stages; None on every stage but the first), or over the GP group (None on every rank but its first)."""
    if parallel.graph is not None:  # the batch's atoms over the GP group; its first rank adds the errors
        part = parallel.graph.shard(batch)
        pred = parallel.graph.predict(model, part, parallel.routing(model, part.local, part.owned_2C))  # collective
        return (pred.energy_G, pred.forces_N3) if parallel.topo.gp_index == 0 else None
    routing = parallel.routing(model, batch)  # collective (MoE)
    if parallel.pipeline is None:
        pred = energy_forces_stress(model, batch, training=False, routing=routing)
        return pred.energy_G, pred.forces_N3
    out = parallel.pipeline.predict(batch, routing)
    return (out["energy"], out["forces"]) if out else None
