"""Everything a training run holds, built in the order the data flow needs:
model → data → normalisation → fine-tuning weights → parallelize → optimizer → restore → calibration → perf log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from exaforce import checkpoint, finetune
from exaforce.comm.groups import CommGroups
from exaforce.config import DTYPES, Config, ConfigError
from exaforce.device import keep_freed_host_memory
from exaforce.model.offload import offload_experts
from exaforce.model.potential import Potential
from exaforce.parallel.parallelize import Parallel, parallelize
from exaforce.parallel.topology import Topology
from exaforce.perf.log import PerfLogWriter
from exaforce.perf.machines import device_machine
from exaforce.training.calibrate import calibrate
from exaforce.training.data import (GlobalIndex, TrainingData, build_global_index, lazy_reader, steps_in_epoch, store_reader,
                                    structure_cost)
from exaforce.training.lock import RunFolderLock
from exaforce.training.metrics import MetricsFile, StepClock
from exaforce.training.normalisation import fit_energy_normalisation
from exaforce.training.progress import Checkpointer, Progress
from exaforce.training.ema import WeightAverage, weight_average
from exaforce.training.schedule import Schedule, make_optimizer


@dataclass
class Run:
    """One training run on this rank, ready for its first (or next) step."""

    cfg: Config
    topo: Topology
    model: Potential
    data: TrainingData
    cost_G: np.ndarray                # predicted seconds per structure: the sampler's deal
    parallel: Parallel
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    average: WeightAverage | None     # optim.ema_decay > 0: the weights' moving average
    progress: Progress
    checkpoints: Checkpointer
    perf: PerfLogWriter
    log: Callable[[str], None]
    device: torch.device
    metrics: MetricsFile | None = None  # rank 0: RUN/metrics.csv
    clock: StepClock = field(default_factory=StepClock)
    expert_load: list[np.ndarray] = field(default_factory=list)  # per MoE layer: world pairs per expert since
                                                                  # the last re-placement


def share_taker(topo: Topology) -> str:
    """What takes a share of each global batch, for messages: a rank, or a pipeline (its stages)."""
    return "rank" if topo.layout.pp == 1 else "pipeline"


def check_batch_fits(cfg: Config, topo: Topology, sources: tuple, index: GlobalIndex) -> None:
    if index.n_train < cfg.data.global_batch_size:
        raise ConfigError(f"data.global_batch_size = {cfg.data.global_batch_size}: only {index.n_train} training "
                          f"structures in {[s.path for s in sources]}; lower it")
    if float(index.weight_G[~index.is_val_G].sum()) < topo.layout.replicas:
        raise ConfigError(f"data.datasets: an epoch holds about {index.weight_G[~index.is_val_G].sum():.1f} "
                          f"structures (weights × training structures), fewer than the {topo.layout.replicas} "
                          f"{share_taker(topo)}s")


def build_model_and_data(cfg: Config, topo: Topology, log: Callable[[str], None],
                         device: torch.device = torch.device("cpu")) -> tuple[Potential, TrainingData]:
    """Collective. The model first (on every rank, same seed: initialised on the host, so every
    device starts from the same weights), then the data, validated against the model's elements;
    reference energies fitted, then fine-tuning weights over them (inherited heads keep their
    references)."""
    torch.manual_seed(cfg.run.seed)
    model = Potential(cfg.model, ep_rank=topo.layout.ep_index(topo.rank), ep_size=topo.layout.ep).to(
        device=device, dtype=DTYPES[cfg.run.dtype])
    species_of = model.species_table()
    sources = cfg.data.sources(cfg.model.heads)
    index, shards = build_global_index(sources, cfg.model.heads, species_of, cfg.model.cutoff,
                                       cfg.model.three_body_cutoff, cfg.run.seed, topo)
    check_batch_fits(cfg, topo, sources, index)
    fit_energy_normalisation(model, shards, index, topo)
    finetune.initialise(model, cfg, log)
    reader = store_reader(shards, index, topo) if cfg.data.sample_store else lazy_reader(sources, index)
    data = TrainingData(sources, index, reader, species_of, cfg.model.cutoff, cfg.model.three_body_cutoff,
                        len(cfg.model.heads), DTYPES[cfg.run.dtype], device)
    return model, data


def build_run(cfg: Config, topo: Topology, groups: CommGroups, log: Callable[[str], None],
              lock: RunFolderLock | None = None, device: torch.device = torch.device("cpu")) -> Run:
    """Collective: a new run on this rank's `device`, or the continuation of the checkpoint
    run.resume names. `lock` (the run folder's) is acquired once the model and data are built,
    before anything is written."""
    if cfg.data.global_batch_size < topo.layout.replicas * cfg.data.micro_batches:
        raise ConfigError(f"data.global_batch_size = {cfg.data.global_batch_size}: need at least "
                          f"{cfg.data.micro_batches} structure(s) per {share_taker(topo)} on {topo.layout.replicas} "
                          f"{share_taker(topo)}s (data.micro_batches)")
    if device.type == "cpu" and cfg.run.keep_host_heap:
        keep_freed_host_memory()
    run_dir = Path(cfg.run.out_dir)
    resume_from = checkpoint.resume_point(run_dir, cfg.run.resume, topo, log)  # collective; None: a new run
    model, data = build_model_and_data(cfg, topo, log, device)
    if lock is not None:
        lock.acquire()  # collective
    parallel = parallelize(model, topo, groups, cfg)
    if cfg.parallel.resident_experts:
        offload_experts(model, cfg.parallel.resident_experts, device)
    optimizer, schedule = make_optimizer(model, cfg)  # after parallelize: the reducers hook the final parameters
    average = weight_average(optimizer, cfg.optim.ema_decay)

    # Restore after the optimizer exists (its state is restored too); weights overwrite the synced start.
    progress = Progress()
    if resume_from:
        progress = Progress(**checkpoint.restore(resume_from, model, optimizer, topo, log)["progress"])
        if average is not None:
            average.swap()  # a checkpoint's model holds the averaged weights, its optimizer state the raw ones
        log(f"resumed from {resume_from} at step {progress.step}")
    elif cfg.run.resume == "latest":
        log(f"resume: no complete checkpoint in {run_dir / 'checkpoints'}: a new run")

    # All ranks calibrate together, once per layout (a resumed run reuses the checkpoint's, so it
    # deals every step exactly as the interrupted run would have).
    layout = calibration_layout(topo, parallel)
    if progress.layout != layout:
        progress.flop_coefficients, progress.cost_coefficients = calibrate(model, data.index, data.batch, cfg, parallel, log)
        progress.layout = layout
    if parallel.graph is not None:  # domains balanced by the counted FLOPs of atoms, bonds and triplets: a
        parallel.graph.weights = progress.flop_coefficients  # measured cost that no timing noise moves
    run = Run(cfg=cfg, topo=topo, model=model, data=data, cost_G=structure_cost(data.index, progress.cost_coefficients),
              parallel=parallel, optimizer=optimizer, schedule=schedule, average=average, progress=progress,
              checkpoints=Checkpointer(cfg, topo, model, optimizer, resume_from, average),
              perf=open_perf_log(cfg, topo, progress, device, resumed=resume_from is not None), log=log, device=device,
              metrics=MetricsFile(run_dir, cfg.model.heads, progress.step if resume_from else None, cfg.run.tensorboard)
              if topo.is_root else None)
    log_start(run)
    return run


def calibration_layout(topo: Topology, parallel: Parallel) -> tuple[int, ...]:
    """What the coefficients depend on besides the model: (world, dp, ep), and with pipeline stages
    also pp, the stages per rank and each stage's block count (a rank's FLOPs are those of its blocks)."""
    layout = (topo.world_size, topo.layout.dp, topo.layout.ep)
    if parallel.pipeline is None:
        return layout
    pipeline = parallel.pipeline
    return (*layout, topo.layout.pp, pipeline.pipeline.chunks, *(len(blocks) for blocks in pipeline.ranges))


def open_perf_log(cfg: Config, topo: Topology, progress: Progress, device: torch.device,
                  resumed: bool) -> PerfLogWriter:
    """Collective: this rank's perf log, its header naming the device rank 0 runs on (the CPU's peak
    measured by rank 0 alone: ranks sharing a node would disturb each other's measurement)."""
    machine = topo.from_root(device_machine(device, DTYPES[cfg.run.dtype]) if topo.is_root else None)  # collective
    perf = PerfLogWriter(Path(cfg.run.out_dir), topo.rank, append=resumed)
    perf.header(rank=topo.rank, world_size=topo.world_size, config=cfg.to_dict(), topology=topo.describe(),
                machine=machine, flop_coefficients=progress.flop_coefficients,
                resumed_from_step=progress.step if resumed else None)
    return perf


def log_start(run: Run) -> None:
    """Collective: the one line that says what this run trains on."""
    cfg, topo, model, cost = run.cfg, run.topo, run.model, run.progress.cost_coefficients
    n_params = topo.pp_sum(sum(p.numel() for p in model.dense_parameters()) + topo.ep_sum(
        sum(p.numel() for p in model.expert_parameters())))  # collectives: every stage's, every EP shard's
    run.log(f"training {n_params:,} parameters on {topo.world_size} rank(s), {len(run.data.sources)} dataset(s) "
            f"({run.data.index.n_train} training structures), global batch {cfg.data.global_batch_size}, "
            f"~{steps_in_epoch(run.data.index, cfg.data.global_batch_size)} steps/epoch, steps "
            f"{run.progress.step + 1}–{cfg.run.steps}; cost/structure = {cost['atoms']:.3g}·atoms + "
            f"{cost['edges']:.3g}·edges + {cost['angles']:.3g}·angles")
    if topo.layout.gp > 1:
        halo = (f"a halo of {cfg.model.blocks} block(s) (ghosts)" if run.parallel.graph.halo == "ghost" else
                "a one-bond halo exchanged twice per block")
        run.log(f"graph parallel: {topo.layout.gp} ranks per group; structures of >= {cfg.parallel.gp_min_atoms} atoms "
                f"split into cost-balanced spatial domains with {halo}, smaller ones "
                "whole to one rank; owned and halo atoms per rank in the perf log (gp_work)")
    pp = topo.layout.pp
    if pp > 1 and cfg.data.micro_batches < 2 * pp:
        run.log(f"warning: parallel.pp = {pp} with data.micro_batches = {cfg.data.micro_batches}: the stages wait "
                f"for each other most of the step (gpipe's bubble is (pp − 1)/(micro-batches + pp − 1) = "
                f"{(pp - 1) / (cfg.data.micro_batches + pp - 1):.0%}); 2·pp micro-batches or more keep it small")
