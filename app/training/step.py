"""One training step, top to bottom: routing → energy → forces/stress → loss → double backward →
gradient reduction → clip → optimizer step.

`loss_and_gradients` is one micro-batch's forward and backward on this rank; `train_step` is the
optimizer step over this rank's micro-batches, with every collective the step needs. Benchmarks,
calibration and the equivalence tests run these same two functions.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from exaforce.config import Config
from exaforce.graph import GraphBatch
from exaforce.loss import structure_losses
from exaforce.model.potential import Potential, energy, forces_and_stress, local_routing, strained_geometry
from exaforce.model.recompute import Recompute
from exaforce.model.routing import Routing
from exaforce.parallel.parallelize import Parallel
from exaforce.training.ema import WeightAverage


def loss_and_gradients(model: Potential, batch: GraphBatch, cfg: Config, loss_scale: float,
                       times: dict[str, float], routing: Routing | None = None, with_aux: bool = True,
                       aux_world_2C: np.ndarray | None = None) -> dict[str, float]:
    """Energy → forces/stress → loss → parameter backward on this rank's batch; adds to `times`.

    loss_scale = replicas / global_batch_size (dp · ep: the world size without pipeline stages and GP
    peers), so averaging gradients over the replicas gives the gradient of the mean loss over the
    global batch (uneven atom counts included). The MoE
    load-balancing loss depends only on the router and the step's world token counts
    (`aux_world_2C`, default this batch's), so it is the same on every rank and enters unscaled:
    the world average of its gradient is its gradient; with micro-batches it joins the last one
    (with_aux) over all their counts. `routing` is the plan from `Parallel.routing` (None: one
    process holds every expert). Returns per-term sums over this rank's structures, plus "moe_aux"
    (MoE, with_aux).
    """
    if routing is None and model.moe_layers:
        routing = local_routing(model, batch)
    with model.offload.scope() if model.offload is not None else nullcontext():  # graphs keep no expert copy
        t0 = time.perf_counter()
        geometry = strained_geometry(batch)
        energy_G = energy(model, batch, geometry, routing, step_plan(model, batch, cfg))
        t1 = time.perf_counter()
        pred = forces_and_stress(energy_G, geometry, batch, training=True)  # create_graph=True; no reduction
        t2 = time.perf_counter()
        losses = structure_losses(pred, batch, cfg.loss)
        objective = losses["total"].sum() * loss_scale
        if model.moe_layers and with_aux:
            losses["moe_aux"] = model.aux_loss(routing, aux_world_2C)
            objective = objective + cfg.loss.moe_aux_weight * losses["moe_aux"]
        objective.backward()  # double backward through the forces; armed reducers launch from here
        t3 = time.perf_counter()
    for key, seconds in (("forward", t1 - t0), ("force_backward", t2 - t1), ("param_backward", t3 - t2),
                         ("alltoall", routing.clock.seconds if routing is not None else 0.0)):
        times[key] = times.get(key, 0.0) + seconds
    return {k: float(v.detach().sum()) for k, v in losses.items()}  # host sync point (on a GPU), once per step


def step_plan(model: Potential, batch: GraphBatch, cfg: Config) -> Recompute | None:
    """Plain or fused for this micro-batch (run.recompute_lines, run.store_all_below; the matris
    block is always plain). Dense models
    choose per micro-batch, each rank on its own (the two paths give the same numbers); MoE models
    take the configured path on every rank, since the fused one re-issues expert all-to-alls
    while it recomputes and every rank must issue the same ones. With the per-block halo exchange
    the GP group chooses from the whole micro-batch, so its ranks build the same graph around the
    exchanges (their backwards meet in the same order on a GPU's autograd thread too)."""
    if model.cfg.block == "matris":
        return None  # it has no fused path
    line_channels = batch.triplet_index_2T.shape[1] * model.cfg.line_channels_per_triplet
    store_all_below = 0 if model.moe_layers else cfg.run.store_all_below
    on_cpu = model.energy_scale_H.device.type == "cpu"  # a buffer every pipeline stage keeps
    return Recompute.from_run(cfg.run.recompute_lines, cfg.run.recompute_bonds, store_all_below, line_channels,
                              release_host_memory=cfg.run.release_host_memory and on_cpu)


@dataclass
class StepResult:
    loss_sums: dict[str, float]       # this rank's per-term sums over its structures (+ "moe_aux")
    loss: float                       # the step's global mean loss: the same on every rank
    grad_norm: float                  # global gradient norm before clipping: the same on every rank
    updated: bool                     # False: non-finite loss or gradient norm, so no optimizer step
    times: dict[str, float]
    routings: list[Routing]           # one per micro-batch (empty: no MoE)
    work: dict[str, int] | None = None  # graph parallelism: the atoms, edges and angles this rank ran (halo included)
    offload: dict[str, float] | None = None  # parallel.resident_experts: bytes fetched, peak resident


def train_step(model: Potential, micro_batches: list[GraphBatch], optimizer: torch.optim.Optimizer,
               parallel: Parallel, cfg: Config, loss_scale: float, lr: float,
               average: WeightAverage | None = None) -> StepResult:
    """One optimizer step on this rank's share of the global batch, accumulated over micro-batches,
    and the weights' average after it (optim.ema_decay). A non-finite loss or gradient norm skips
    the update on every rank alike (the caller applies run.nonfinite)."""
    topo, reduction = parallel.topo, parallel.reduction
    times: dict[str, float] = {}
    # Freed, not zeroed: the backward's first gradient of each parameter becomes its .grad without a
    # copy, so no second full set of gradients lives through the backward (moe-1b: ~1 GiB per rank).
    optimizer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    shards = [parallel.graph.shard(b) for b in micro_batches] if parallel.graph is not None else None
    if shards is not None:
        times["gp_shard"] = time.perf_counter() - t0
        t0 = time.perf_counter()
    routings = [parallel.routing(model, b) for b in micro_batches] if shards is None else \
        [parallel.routing(model, s.local, s.owned_2C) for s in shards]  # collectives (MoE)
    times["routing"] = time.perf_counter() - t0
    aux_counts = sum(r.counts.world_2C for r in routings) if model.moe_layers else None
    loss_sums: dict[str, float] = {}
    if parallel.pipeline is not None:  # the micro-batches through the stages; reduced after the last
        plans = [step_plan(model, b, cfg) for b in micro_batches]
        loss_sums = parallel.pipeline.run(micro_batches, routings, plans, loss_scale, times, aux_counts)
    elif shards is not None:  # each micro-batch over the GP group; this rank's share of the gradients
        for i, (part, batch, routing) in enumerate(zip(shards, micro_batches, routings)):
            last = i == len(shards) - 1
            if last:
                reduction.arm()
            aux = model.aux_loss(routing, aux_counts) if model.moe_layers and last else None
            losses = parallel.graph.loss_and_gradients(model, part, cfg.loss, loss_scale, routing,
                                                       step_plan(model, batch if part.halo else part.local, cfg),
                                                       None if aux is None else cfg.loss.moe_aux_weight * aux, times)
            if aux is not None:
                losses["moe_aux"] = aux
            for key, value in losses.items():  # the group's first rank reports its structures' losses
                if key == "moe_aux" or topo.gp_index == 0:
                    loss_sums[key] = loss_sums.get(key, 0.0) + float(value.detach().sum())
    else:
        for i, (batch, routing) in enumerate(zip(micro_batches, routings)):
            last = i == len(micro_batches) - 1
            if last:
                reduction.arm()  # this backward launches the gradient buckets as they complete
            sums = loss_and_gradients(model, batch, cfg, loss_scale, times, routing, with_aux=last,
                                      aux_world_2C=aux_counts)
            for key, value in sums.items():
                loss_sums[key] = loss_sums.get(key, 0.0) + value
    if cfg.comm.sync_before_reduce:
        t0 = time.perf_counter()
        topo.barrier()  # collective: the wait for the slowest rank, timed on its own
        times["imbalance"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    reduction.finish(model)  # collectives: dense over the stage's replicas, experts over EDP, replicas over EP
    loss = topo.sum(loss_sums.get("total", 0.0)) * loss_scale / topo.layout.replicas  # collective: global mean
    t1 = time.perf_counter()
    norm = parallel.clip_grad_norm(model, cfg.optim.grad_clip)  # collective over the EP group and the pipeline
    # Ranks agree before they act: the loss, the norm and the aux loss (world counts) are equal everywhere.
    updated = all(math.isfinite(x) for x in (loss, norm, loss_sums.get("moe_aux", 0.0)))
    if updated:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        if average is not None:
            average.update()
    else:
        optimizer.zero_grad(set_to_none=True)
    times.update(comm=t1 - t0, optimizer=time.perf_counter() - t1)
    work = None if shards is None else {k: sum(s.counts()[k] for s in shards) for k in shards[0].counts()}
    offload = model.offload.step_done() if model.offload is not None else None  # host weights changed
    return StepResult(loss_sums, loss, norm, updated, times, routings if model.moe_layers else [], work, offload)
