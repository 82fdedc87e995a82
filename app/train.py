"""Training over a dp × ep topology: model → data → parallelize → optimizer → restore → calibration → loop.

The entry point `train(cfg, topo, log)` reads as the data flow; `train_step` is one step top to
bottom. Faults (exaforce.faults): scheduler signals end a run with a checkpoint at a step boundary
and REQUEUE_EXIT_CODE; a non-finite step is skipped or stops the run (run.nonfinite); a watchdog
aborts a job whose step makes no progress. Checkpoints and resume: exaforce.checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from exaforce import checkpoint, finetune
from exaforce.config import DTYPES, Config, ConfigError
from exaforce.dataset import (GlobalIndex, build_global_index, lazy_reader, steps_in_epoch, store_reader,
                               structure_cost)
from exaforce.evaluate import validation_mae
from exaforce.faults import NONFINITE_EXIT_CODE, REQUEUE_EXIT_CODE, RunStopped, StopSignals, Watchdog
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


def calibrate(model: Potential, index: GlobalIndex, to_batch: Callable[[np.ndarray], GraphBatch], cfg: Config,
              topo: Topology) -> tuple[dict[str, float], dict[str, float]]:
    """(FLOP, cost) coefficients from six calibration steps per rank on batches of 1 to 5 of its structures."""
    mine = np.flatnonzero(~index.is_val_G)[topo.rank::topo.world_size]
    batches = [to_batch(mine[np.arange(i, i + k) % len(mine)])
               for i, k in ((0, 1), (1, 2), (3, 3), (6, 4), (10, 2), (12, 5))]
    flop_coefficients = calibrate_flops(model, batches, cfg, topo)
    return flop_coefficients, calibrate_cost(model, batches, cfg, topo, flop_coefficients)


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


@dataclass
class StepResult:
    loss_sums: dict[str, float]       # this rank's per-term sums over its structures (+ "moe_aux")
    loss: float                       # the step's global mean loss: the same on every rank
    grad_norm: float                  # global gradient norm before clipping: the same on every rank
    updated: bool                     # False: non-finite loss or gradient norm, so no optimizer step
    times: dict[str, float]
    routing: Routing | None           # the last micro-batch's


def train_step(model: Potential, micro_batches: list[GraphBatch], optimizer: torch.optim.Optimizer,
               reduction: GradientReduction, cfg: Config, topo: Topology, loss_scale: float,
               lr: float) -> StepResult:
    """One optimizer step on this rank's share of the global batch, accumulated over micro-batches.
    A non-finite loss or gradient norm skips the update on every rank alike (the caller applies
    run.nonfinite)."""
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
    loss = topo.world.allreduce(loss_sums["total"]) * loss_scale / topo.world_size  # collective: global mean
    t1 = time.perf_counter()
    norm = clip_grad_norm(model, topo, cfg.optim.grad_clip)  # collective over the EP group
    # Ranks agree before they act: the loss, the norm and the aux loss (world counts) are equal everywhere.
    updated = all(math.isfinite(x) for x in (loss, norm, loss_sums.get("moe_aux", 0.0)))
    if updated:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    times.update(comm=t1 - t0, optimizer=time.perf_counter() - t1)
    return StepResult(loss_sums, loss, norm, updated, times, routings[-1])


def peak_memory_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@dataclass
class Progress:
    """What a checkpoint holds besides weights, optimizer state and RNG states."""

    step: int = 0                     # optimizer steps taken = global batches consumed (the sampler's
                                      # position) = the LR schedule's step
    skipped_steps: int = 0            # steps without an update (non-finite, run.nonfinite = "skip")
    layout: tuple[int, int, int] = (0, 0, 0)   # (world, dp, ep) the coefficients below were measured on
    flop_coefficients: dict[str, float] = field(default_factory=dict)
    cost_coefficients: dict[str, float] = field(default_factory=dict)  # the sampler's deal


def train(cfg: Config, topo: Topology, log: Callable[[str], None], signals: StopSignals | None = None) -> Path:
    """Trains up to step cfg.run.steps, from scratch or from a checkpoint (run.resume); returns the
    run folder (perf logs, checkpoints).

    Ends early, on every rank alike, by raising RunStopped: after a scheduler signal caught by the
    entry point's `signals` (checkpoint, REQUEUE_EXIT_CODE), or on a non-finite step under
    run.nonfinite = "stop" (checkpoint of the last good state, NONFINITE_EXIT_CODE)."""
    signals = signals or StopSignals(install=False)
    dtype = DTYPES[cfg.run.dtype]
    world, rank = topo.world_size, topo.rank
    layout = (world, topo.layout.dp, topo.layout.ep)
    if cfg.data.global_batch_size < world * cfg.data.micro_batches:
        raise ConfigError(f"data.global_batch_size = {cfg.data.global_batch_size}: need at least "
                          f"{cfg.data.micro_batches} structure(s) per rank on {world} ranks (data.micro_batches)")
    run_dir = Path(cfg.run.out_dir)
    resume_from = checkpoint.resume_point(run_dir, cfg.run.resume, topo.world)  # collective; None: a new run

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
    finetune.initialise(model, cfg, log)  # run.init_from, after the fit: inherited heads keep their references
    reader = store_reader(shards, index, topo.world) if cfg.data.sample_store else lazy_reader(sources, index)
    del shards

    # Parallelize: identical start on every rank (dense) and EDP group (experts), then the reducers.
    sync_initial_parameters(model, topo, cfg.comm.backend)
    reduction = GradientReduction(model, topo, cfg.comm)
    optimizer, lr_at = make_optimizer(model, cfg)

    # Restore after the optimizer exists (its state is restored too); weights overwrite the synced start.
    progress = Progress()
    if resume_from:
        progress = Progress(**checkpoint.restore(resume_from, model, optimizer, topo, log)["progress"])
        log(f"resumed from {resume_from} at step {progress.step}")
    elif cfg.run.resume == "latest":
        log(f"resume: no complete checkpoint in {run_dir / 'checkpoints'}: a new run")

    def to_batch(global_indices: np.ndarray) -> GraphBatch:
        return build_batch(reader.fetch(global_indices), species_of, cfg.model.cutoff, cfg.model.three_body_cutoff,
                           index.head_G[global_indices], len(cfg.model.heads)).to("cpu", dtype)

    # Perf accounting and the cost model: all ranks calibrate together, once per layout (a resumed run
    # reuses the checkpoint's, so it deals every step exactly as the interrupted run would have).
    if progress.layout != layout:
        progress.flop_coefficients, progress.cost_coefficients = calibrate(model, index, to_batch, cfg, topo)
        progress.layout = layout
    flop_coefficients, cost_coefficients = progress.flop_coefficients, progress.cost_coefficients
    cost_G = structure_cost(index, cost_coefficients)
    machine = topo.world.bcast(local_machine(dtype) if rank == 0 else None, root=0)  # collective
    perf = PerfLogWriter(run_dir, rank, append=resume_from is not None)
    perf.header(rank=rank, world_size=world, config=cfg.to_dict(), topology=topo.describe(), machine=machine,
                flop_coefficients=flop_coefficients, resumed_from_step=progress.step if resume_from else None)
    n_params = sum(p.numel() for p in model.dense_parameters()) + topo.ep_comm.allreduce(
        sum(p.numel() for p in model.expert_parameters()))  # collective
    epoch_steps = steps_in_epoch(index, cfg.data.global_batch_size)
    log(f"training {n_params:,} parameters on {world} rank(s), {len(sources)} dataset(s) "
        f"({n_train} training structures), global batch {cfg.data.global_batch_size}, "
        f"~{epoch_steps} steps/epoch, steps {progress.step + 1}–{cfg.run.steps}; cost/structure = "
        f"{cost_coefficients['atoms']:.3g}·atoms + {cost_coefficients['edges']:.3g}·edges + "
        f"{cost_coefficients['angles']:.3g}·angles")
    batches = global_batches(index.weight_G, ~index.is_val_G, cfg.data.global_batch_size, world, cfg.run.seed,
                             start_step=progress.step)

    saved = resume_from  # the newest checkpoint of this trajectory

    def save(state: Progress) -> Path:  # collective; a step already on disk is not written again
        nonlocal saved
        if saved != checkpoint.step_folder(run_dir, state.step):
            saved = checkpoint.save(run_dir, state.step, model, optimizer, topo, checkpoint_meta(cfg, state),
                                    cfg.run.keep_checkpoints)
        return saved

    stop: RunStopped | None = None
    wall0 = time.perf_counter()
    with Watchdog(topo.world, cfg.run.step_timeout_s) as watchdog:
        for step in range(progress.step + 1, cfg.run.steps + 1):
            watchdog.beat(f"step {step}")
            t0 = time.perf_counter()
            epoch, global_batch = next(batches)
            shares = deal(global_batch, cost_G[global_batch], world, cfg.data.balance)
            n_micro = min(cfg.data.micro_batches, min(len(share) for share in shares))  # the same on every rank
            micro_batches = [to_batch(part) for part in np.array_split(shares[rank], n_micro)]
            loss_scale = world / len(global_batch)  # the mean over this step's global batch
            t_data = time.perf_counter() - t0
            lr = lr_at(step)
            result = train_step(model, micro_batches, optimizer, reduction, cfg, topo, loss_scale, lr)
            if not result.updated and cfg.run.nonfinite == "skip":
                progress.skipped_steps += 1
            times, loss_sums = result.times, result.loss_sums
            counts = {k: sum(b.counts()[k] for b in micro_batches) for k in micro_batches[0].counts()}
            times["data"] = t_data
            times["total"] = time.perf_counter() - t0
            share_cost = [float(cost_G[share].sum()) for share in shares]  # predicted seconds per rank
            extra = {"cost": share_cost[rank], "cost_max_over_mean": max(share_cost) / max(np.mean(share_cost), 1e-30),
                     "loss": result.loss, "grad_norm": result.grad_norm, "skipped_steps": progress.skipped_steps}
            if not result.updated:
                extra["skipped"] = True
            if result.routing:
                extra.update(moe_aux=loss_sums.pop("moe_aux"), expert_load=result.routing.expert_load())
            if (cfg.run.val_every and step % cfg.run.val_every == 0) or step == cfg.run.steps:
                watchdog.beat(f"validation at step {step}")
                extra["val"] = validation_mae(model, index, to_batch, cost_G, max(1, len(global_batch) // world), topo,
                                              cfg.comm.backend)  # collective
                for head, m in extra["val"].items():
                    log(f"validation {head}: energy MAE {m['energy_mev_per_atom']:.1f} meV/atom, forces MAE "
                        f"{m['forces_mev_per_a']:.1f} meV/Å ({m['structures']} structures)")
            perf.step(step=step, epoch=epoch, times=times, loss_sum=loss_sums,
                      flops=predict_flops(flop_coefficients, counts["atoms"], counts["edges"], counts["angles"]),
                      peak_mem_bytes=peak_memory_bytes(), lr=lr, extra=extra, **counts)
            if step % cfg.run.log_every == 0 or step == 1 or step == cfg.run.steps:
                log(f"step {step:>5}/{cfg.run.steps}  loss {result.loss:.4g}  {times['total'] * 1e3:.0f} ms")

            # Faults: every rank takes the same decision (the loss and the norm are global, signals agreed).
            if not result.updated:
                what = f"step {step}: non-finite loss ({result.loss:.6g}) or gradient norm ({result.grad_norm:.6g})"
                if cfg.run.nonfinite == "stop":
                    watchdog.beat(f"checkpoint of step {progress.step}")
                    stop = RunStopped(f"{what}: stopping (run.nonfinite = \"stop\"); the last good state (step "
                                      f"{progress.step}) is in {save(progress)}; exiting {NONFINITE_EXIT_CODE}",
                                      NONFINITE_EXIT_CODE)
                    break
                log(f"{what}: step skipped, no parameter update (run.nonfinite = \"skip\"; "
                    f"{progress.skipped_steps} skipped so far)")
            progress.step = step
            if cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0:
                watchdog.beat(f"checkpoint of step {step}")
                save(progress)
            signal_name = signals.agreed(topo.world)  # collective: 8 bytes once a step, the whole cost of signals
            if signal_name:
                watchdog.beat(f"checkpoint of step {step}")
                stop = RunStopped(f"signal {signal_name} received at step {step}: checkpoint written to "
                                  f"{save(progress)}; exiting {REQUEUE_EXIT_CODE} for requeue", REQUEUE_EXIT_CODE)
                break

        if stop is None:
            perf.end(steps=cfg.run.steps, wall_s=time.perf_counter() - wall0, skipped_steps=progress.skipped_steps)
            peaks = topo.world.gather(peak_memory_bytes(), root=0)  # collective
            if rank == 0:
                log("peak memory per rank (max RSS): " + ", ".join(f"{r}: {b / 2**30:.2f} GiB"
                                                                   for r, b in enumerate(peaks)))
            if cfg.run.final_checkpoint:
                watchdog.beat("final checkpoint")
                folder = save(progress)
                log(f"checkpoint: {folder}; model: {export_model(folder, topo)}")  # collective
    perf.close()
    reader.close()
    if stop is not None:
        log(str(stop))
        raise stop
    return run_dir


def checkpoint_meta(cfg: Config, progress: Progress) -> dict:
    """What dense.pt carries besides the weights: `step` and `config` (read by exaforce.checkpoint.load), progress."""
    return {"step": progress.step, "config": cfg.to_dict(), "progress": dataclasses.asdict(progress)}


def export_model(folder: Path, topo: Topology) -> Path:
    """Collective: rank 0 writes the whole model of checkpoint `folder` as one file beside it (what the
    ASE calculator, `exaforce predict` and fine-tuning read); returns its path."""
    path = folder.with_suffix(".pt")
    if topo.is_root:
        checkpoint.export_model(folder, path)
    topo.world.Barrier()  # collective: nobody reports the file before it exists
    return path


def save_checkpoint(model: Potential, optimizer: torch.optim.Optimizer, cfg: Config, step: int, run_dir: Path,
                    topo: Topology) -> Path:
    """Collective: checkpoint folder `step` of a model trained outside train() (no sampler progress:
    resuming from it recalibrates), and the whole model in one file beside it; returns that file."""
    folder = checkpoint.save(Path(run_dir), step, model, optimizer, topo, checkpoint_meta(cfg, Progress(step=step)),
                             cfg.run.keep_checkpoints)
    return export_model(folder, topo)
