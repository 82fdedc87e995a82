"""Training over a dp × ep topology: model → data → parallelize → optimizer → cost calibration → loop.

The entry point `train(cfg, topo)` reads as the data flow; `train_step` is one step top to bottom.
"""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from exaforce import checkpoint
from exaforce.config import DTYPES, Config, ConfigError
from exaforce.dataset import (GlobalIndex, build_global_index, lazy_reader, steps_in_epoch, store_reader,
                               structure_cost)
from exaforce.evaluate import validation_mae
from exaforce.io.sampler import deal, global_batches, shard_range
from exaforce.io.schema import Frames
from exaforce.loss import structure_losses
from exaforce.model.graph import GraphBatch, build_batch
from exaforce.model.potential import Potential, energy, forces_and_stress, local_routing, strained_geometry
from exaforce.model.routing import Routing
from exaforce.parallel import GradientReduction, clip_grad_norm, step_routing, sync_initial_parameters
from exaforce.perf.flops import count_flops, fit_flop_coefficients, predict_flops
from exaforce.perf.log import PerfLogWriter
from exaforce.perf.machines import local_machine
from exaforce.topology import Topology


def fit_energy_normalisation(model: Potential, shards: list[Frames], index: GlobalIndex, topo: Topology) -> None:
    """Per head: per-element reference energies by least squares over its training structures, and
    the energy scale as their RMS force component; from all-reduced sums, so every rank (and any
    number of ranks) gets the same values. Validation structures take no part."""
    n_heads, n_elements = len(model.cfg.heads), len(model.cfg.elements)
    species_of = model.species_table()
    sums = np.zeros((n_heads, n_elements**2 + n_elements + 2))
    first = np.r_[0, np.cumsum(np.bincount(index.dataset_G, minlength=len(shards)))[:-1]]
    for d, frames in enumerate(shards):
        start, _ = shard_range(int(np.sum(index.dataset_G == d)), topo.rank, topo.world_size)
        g = first[d] + start + np.arange(len(frames))
        keep_S = ~index.is_val_G[g]
        if not len(frames):
            continue
        head = int(index.head_G[first[d]])
        graph_N = np.repeat(np.arange(len(frames)), frames.natoms_S)
        counts_SX = np.zeros((len(frames), n_elements))
        np.add.at(counts_SX, (graph_N, species_of[frames.numbers_N]), 1.0)
        counts_SX, energy_S = counts_SX[keep_S], frames.energy_S[keep_S]
        forces = frames.forces_N3[keep_S[graph_N]]
        sums[head] += np.concatenate([(counts_SX.T @ counts_SX).ravel(), counts_SX.T @ energy_S,
                                      [np.square(forces).sum(), forces.size]])
    sums = topo.world.allreduce(sums)  # collective: normal equations and force moments per head
    for h in range(n_heads):
        ata = sums[h, :n_elements**2].reshape(n_elements, n_elements)
        atb = sums[h, n_elements**2:n_elements**2 + n_elements]
        reference_X = np.linalg.lstsq(ata, atb, rcond=None)[0]  # elements absent from the data get 0
        force_rms = math.sqrt(sums[h, -2] / max(sums[h, -1], 1.0))
        model.reference_energy_HX[h].copy_(torch.from_numpy(reference_X))
        model.energy_scale_H[h].fill_(force_rms if force_rms > 0 else 1.0)


def _fit_world_mean(model: Potential, batches: list[GraphBatch], cfg: Config, topo: Topology,
                    measure: Callable[[Callable[[], object]], float]) -> dict[str, float]:
    """Runs one training step per calibration batch through `measure` (FLOPs or seconds) and fits
    c0 + c_a·atoms + c_e·edges + c_t·angles to the world means (collective: every rank runs the
    same number of steps on its own batches; with expert parallelism an expert's work depends on
    every rank's tokens, so the coefficients predict a rank's share of the step)."""
    samples = []
    for batch in batches:
        routing = step_routing(model, batch, topo, cfg.comm.backend)
        value = measure(lambda: loss_and_gradients(model, batch, cfg, 1.0, {}, routing))
        c = batch.counts()
        samples.append((c["atoms"], c["edges"], c["angles"], float(value)))
    model.zero_grad(set_to_none=True)
    mean = np.asarray(topo.world.allreduce(np.asarray(samples))) / topo.world_size  # collective
    return fit_flop_coefficients([tuple(row) for row in mean])


def calibrate_flops(model: Potential, batches: list[GraphBatch], cfg: Config, topo: Topology) -> dict[str, float]:
    """FLOPs of one training step (forward, force backward, parameter backward) from FlopCounterMode."""
    return _fit_world_mean(model, batches, cfg, topo, count_flops)


def calibrate_cost(model: Potential, batches: list[GraphBatch], cfg: Config, topo: Topology,
                   flop_coefficients: dict[str, float]) -> dict[str, float]:
    """Seconds of a step from timed steps; the sampler deals structures by this cost. A noisy fit
    with a negative slope falls back to the FLOP coefficients, which are proportional to the work."""
    def seconds_of(step: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        step()
        return time.perf_counter() - t0

    seconds = _fit_world_mean(model, batches, cfg, topo, seconds_of)
    if min(seconds["atoms"], seconds["edges"], seconds["angles"]) < 0:
        return flop_coefficients
    return seconds


def make_optimizer(model: Potential, cfg: Config) -> tuple[torch.optim.Optimizer, Callable[[int], float]]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)

    def lr_at(step: int) -> float:
        """Linear warm-up, then cosine decay to 10% of the peak at the last step."""
        if step <= cfg.optim.warmup_steps:
            return cfg.optim.lr * step / max(cfg.optim.warmup_steps, 1)
        progress = (step - cfg.optim.warmup_steps) / max(cfg.run.steps - cfg.optim.warmup_steps, 1)
        return cfg.optim.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))

    return optimizer, lr_at


def loss_and_gradients(model: Potential, batch: GraphBatch, cfg: Config, loss_scale: float,
                       times: dict[str, float], routing: Routing | None = None, with_aux: bool = True,
                       aux_world_2C: np.ndarray | None = None) -> dict[str, float]:
    """Energy → forces/stress → loss → parameter backward on this rank's batch; adds to `times`.

    loss_scale = world_size / global_batch_size, so averaging gradients over the world gives the
    gradient of the mean loss over the global batch (uneven atom counts included). The MoE
    load-balancing loss depends only on the router and the step's world token counts
    (`aux_world_2C`, default this batch's), so it is the same on every rank and enters unscaled:
    the world average of its gradient is its gradient; with micro-batches it joins the last one
    (with_aux) over all their counts. `routing` is the plan from `step_routing` (None: one process
    holds every expert). Returns per-term sums over this rank's structures, plus "moe_aux" (MoE, with_aux).
    """
    if routing is None and model.moe_layers:
        routing = local_routing(model, batch)
    t0 = time.perf_counter()
    geometry = strained_geometry(batch)
    energy_G = energy(model, batch, geometry, routing)
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


def train_step(model: Potential, micro_batches: list[GraphBatch], optimizer: torch.optim.Optimizer,
               reduction: GradientReduction, cfg: Config, topo: Topology, loss_scale: float,
               lr: float) -> tuple[dict, dict, Routing | None]:
    """One optimizer step on this rank's share of the global batch, accumulated over micro-batches;
    returns (loss sums, times, the last micro-batch's routing)."""
    times: dict[str, float] = {}
    optimizer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    routings = [step_routing(model, b, topo, cfg.comm.backend) for b in micro_batches]  # collectives (MoE)
    times["routing"] = time.perf_counter() - t0
    aux_counts = sum(r.counts.world_2C for r in routings) if model.moe_layers else None
    loss_sums: dict[str, float] = {}
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
        topo.world.Barrier()  # collective: the wait for the slowest rank, timed on its own
        times["imbalance"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    reduction.finish()  # collectives: dense over the world, experts over their EDP group
    t1 = time.perf_counter()
    if cfg.optim.grad_clip > 0:
        clip_grad_norm(model, topo, cfg.optim.grad_clip)  # collective over the EP group
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    times.update(comm=t1 - t0, optimizer=time.perf_counter() - t1)
    return loss_sums, times, routings[-1]


def peak_memory_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def train(cfg: Config, topo: Topology, log: Callable[[str], None]) -> Path:
    """Runs cfg.run.steps optimizer steps; returns the run folder (perf logs, checkpoint)."""
    dtype = DTYPES[cfg.run.dtype]
    world, rank = topo.world_size, topo.rank
    if cfg.data.global_batch_size < world * cfg.data.micro_batches:
        raise ConfigError(f"data.global_batch_size = {cfg.data.global_batch_size}: need at least "
                          f"{cfg.data.micro_batches} structure(s) per rank on {world} ranks (data.micro_batches)")

    # Model first (on every rank, same seed), then data, validated against the model's elements.
    torch.manual_seed(cfg.run.seed)
    model = Potential(cfg.model, ep_rank=topo.layout.coords(rank)[1], ep_size=topo.layout.ep).to(dtype)
    species_of = model.species_table()
    sources = cfg.data.sources(cfg.model.heads)
    index, shards = build_global_index(sources, cfg.model.heads, species_of, cfg.model.cutoff,
                                       cfg.model.three_body_cutoff, cfg.run.seed, topo.world)
    n_train = int((~index.is_val_G).sum())
    if n_train < cfg.data.global_batch_size:
        raise ConfigError(f"data.global_batch_size = {cfg.data.global_batch_size}: only {n_train} training "
                          f"structures in {[s.path for s in sources]}; lower it")
    if float(index.weight_G[~index.is_val_G].sum()) < world:
        raise ConfigError(f"data.datasets: an epoch holds about {index.weight_G[~index.is_val_G].sum():.1f} "
                          f"structures (weights × training structures), fewer than the {world} ranks")
    fit_energy_normalisation(model, shards, index, topo)
    reader = store_reader(shards, index, topo.world) if cfg.data.sample_store else lazy_reader(sources, index)
    del shards

    # Parallelize: identical start on every rank (dense) and EDP group (experts), then the reducers.
    sync_initial_parameters(model, topo, cfg.comm.backend)
    reduction = GradientReduction(model, topo, cfg.comm)
    optimizer, lr_at = make_optimizer(model, cfg)

    def to_batch(global_indices: np.ndarray) -> GraphBatch:
        return build_batch(reader.fetch(global_indices), species_of, cfg.model.cutoff, cfg.model.three_body_cutoff,
                           index.head_G[global_indices], len(cfg.model.heads)).to("cpu", dtype)

    # Perf accounting and the cost model: all ranks calibrate together; rank 0 measures the peak FLOP/s.
    run_dir = Path(cfg.run.out_dir)
    mine = np.flatnonzero(~index.is_val_G)[rank::world]
    calibration = [to_batch(mine[np.arange(i, i + k) % len(mine)])
                   for i, k in ((0, 1), (1, 2), (3, 3), (6, 4), (10, 2), (12, 5))]
    flop_coefficients = calibrate_flops(model, calibration, cfg, topo)
    cost_coefficients = calibrate_cost(model, calibration, cfg, topo, flop_coefficients)
    cost_G = structure_cost(index, cost_coefficients)
    machine = topo.world.bcast(local_machine(dtype) if rank == 0 else None, root=0)  # collective
    perf = PerfLogWriter(run_dir, rank)
    perf.header(rank=rank, world_size=world, config=cfg.to_dict(), topology=topo.describe(),
                machine=machine, flop_coefficients=flop_coefficients)
    n_params = sum(p.numel() for p in model.dense_parameters()) + topo.ep_comm.allreduce(
        sum(p.numel() for p in model.expert_parameters()))  # collective
    epoch_steps = steps_in_epoch(index, cfg.data.global_batch_size)
    log(f"training {n_params:,} parameters on {world} rank(s), {len(sources)} dataset(s) "
        f"({n_train} training structures), global batch {cfg.data.global_batch_size}, "
        f"~{epoch_steps} steps/epoch, {cfg.run.steps} steps; cost/structure = "
        f"{cost_coefficients['atoms']:.3g}·atoms + {cost_coefficients['edges']:.3g}·edges + "
        f"{cost_coefficients['angles']:.3g}·angles")
    batches = global_batches(index.weight_G, ~index.is_val_G, cfg.data.global_batch_size, world, cfg.run.seed)

    wall0 = time.perf_counter()
    for step in range(1, cfg.run.steps + 1):
        t0 = time.perf_counter()
        epoch, global_batch = next(batches)
        shares = deal(global_batch, cost_G[global_batch], world, cfg.data.balance)
        n_micro = min(cfg.data.micro_batches, min(len(share) for share in shares))  # the same on every rank
        micro_batches = [to_batch(part) for part in np.array_split(shares[rank], n_micro)]
        loss_scale = world / len(global_batch)  # the mean over this step's global batch
        t_data = time.perf_counter() - t0
        lr = lr_at(step)
        loss_sums, times, routing = train_step(model, micro_batches, optimizer, reduction, cfg, topo, loss_scale, lr)
        counts = {k: sum(b.counts()[k] for b in micro_batches) for k in micro_batches[0].counts()}
        times["data"] = t_data
        times["total"] = time.perf_counter() - t0
        share_cost = [float(cost_G[share].sum()) for share in shares]  # predicted seconds per rank
        extra = {"cost": share_cost[rank], "cost_max_over_mean": max(share_cost) / max(np.mean(share_cost), 1e-30)}
        if routing:
            extra.update(moe_aux=loss_sums.pop("moe_aux"), expert_load=routing.expert_load())
        if (cfg.run.val_every and step % cfg.run.val_every == 0) or step == cfg.run.steps:
            extra["val"] = validation_mae(model, index, to_batch, cost_G, max(1, len(global_batch) // world), topo,
                                          cfg.comm.backend)  # collective
            for head, m in extra["val"].items():
                log(f"validation {head}: energy MAE {m['energy_mev_per_atom']:.1f} meV/atom, forces MAE "
                    f"{m['forces_mev_per_a']:.1f} meV/Å ({m['structures']} structures)")
        perf.step(step=step, epoch=epoch, times=times, loss_sum=loss_sums,
                  flops=predict_flops(flop_coefficients, counts["atoms"], counts["edges"], counts["angles"]),
                  peak_mem_bytes=peak_memory_bytes(), lr=lr, extra=extra, **counts)
        if rank == 0 and (step % cfg.run.log_every == 0 or step == 1 or step == cfg.run.steps):
            log(f"step {step:>5}/{cfg.run.steps}  loss(rank 0) {loss_sums['total'] / counts['structures']:.4g}  "
                f"{times['total'] * 1e3:.0f} ms")
        if cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0:
            save_checkpoint(model, optimizer, cfg, step, run_dir, topo)
    perf.end(steps=cfg.run.steps, wall_s=time.perf_counter() - wall0)
    perf.close()
    reader.close()
    peaks = topo.world.gather(peak_memory_bytes(), root=0)  # collective
    if rank == 0:
        log("peak memory per rank (max RSS): " + ", ".join(f"{r}: {b / 2**30:.2f} GiB" for r, b in enumerate(peaks)))
    if cfg.run.final_checkpoint:
        path = save_checkpoint(model, optimizer, cfg, cfg.run.steps, run_dir, topo)
        log(f"checkpoint: {path}")
    topo.world.Barrier()  # collective: nobody reports done before the checkpoint exists
    return run_dir


def full_model_state(model: Potential, topo: Topology) -> dict | None:
    """The whole model's state on world rank 0 (None elsewhere): with ep > 1 the expert shards of
    the first EP group are gathered to it (collective over that group)."""
    state = model.state_dict()
    if topo.layout.ep == 1:
        return state if topo.is_root else None
    if topo.layout.coords(topo.rank)[0] != 0:
        return None
    shards = topo.ep_comm.gather({k: v for k, v in state.items() if ".experts." in k}, root=0)  # collective
    if not topo.is_root:
        return None
    for shard in shards:
        state.update(shard)
    return state


def save_checkpoint(model: Potential, optimizer: torch.optim.Optimizer, cfg: Config, step: int, run_dir: Path,
                    topo: Topology) -> Path:
    """One file with the full model. The optimizer state is saved for ep = 1 only: its expert part is
    sharded with the experts (sharded checkpoints and exact resume: the fault-tolerance issue)."""
    path = run_dir / "checkpoints" / f"step-{step:08d}.pt"
    model_state = full_model_state(model, topo)
    if topo.is_root:
        state = {"step": step, "config": cfg.to_dict(), "model": model_state,
                 "optimizer": optimizer.state_dict() if topo.layout.ep == 1 else None}
        checkpoint.save_atomic(state, path)
    return path
