"""`train()`: the training loop over a dp × pp × gp × ep topology, from a new run or a checkpoint.

Read it top to bottom: build the run (exaforce.training.setup), then per step: deal the global
batch, take the step (exaforce.training.step), report it, and decide — on every rank alike — whether
to checkpoint or stop. The global batch is dealt into `topo.layout.replicas` shares (dp · ep, the
world size without pipeline stages and GP peers); every stage of a pipeline, and every rank of a GP
group, takes its replica's share.

Faults (exaforce.faults): scheduler signals end a run with a checkpoint at a step boundary and
REQUEUE_EXIT_CODE; a non-finite step is skipped or stops the run (run.nonfinite); a watchdog aborts a
job whose step makes no progress.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from exaforce.comm.groups import CommGroups
from exaforce.config import Config
from exaforce.device import device_peak_memory_bytes
from exaforce.faults import NONFINITE_EXIT_CODE, REQUEUE_EXIT_CODE, RunStopped, StopSignals, Watchdog
from exaforce.io.sampler import deal, global_batches
from exaforce.model.routing import expert_load
from exaforce.parallel.expert_parallel import move_experts
from exaforce.parallel.placement import balanced_placement, max_over_mean
from exaforce.parallel.topology import Topology
from exaforce.perf.flops import predict_flops
from exaforce.training.lock import RunFolderLock
from exaforce.training.metrics import LOSS_TERMS, StepClock
from exaforce.training.progress import (peak_memory_bytes, resident_memory_bytes, step_log_line,
                                        validation_log_lines)
from exaforce.training.setup import Run, build_run
from exaforce.training.step import StepResult, train_step
from exaforce.training.validation import validation_mae


def train(cfg: Config, topo: Topology, groups: CommGroups, log: Callable[[str], None],
          signals: StopSignals | None = None, device: torch.device = torch.device("cpu")) -> Path:
    """Trains up to step cfg.run.steps; returns the run folder (perf logs, checkpoints).

    Ends early, on every rank alike, by raising RunStopped: after a scheduler signal caught by the
    entry point's `signals` (checkpoint, REQUEUE_EXIT_CODE), or on a non-finite step under
    run.nonfinite = "stop" (checkpoint of the last good state, NONFINITE_EXIT_CODE)."""
    started = time.perf_counter()  # run.max_seconds counts from here
    signals = signals or StopSignals(install=False)
    stop_during_start_up(signals, topo, "before start-up", log)
    with RunFolderLock(Path(cfg.run.out_dir), topo, log) as lock:  # one run per run folder
        run = build_run(cfg, topo, groups, log, lock, device)
        stop_during_start_up(signals, topo, f"during start-up (before step {run.progress.step + 1})", log)
        index = run.data.index
        batches = global_batches(index.weight_G, ~index.is_val_G, cfg.data.global_batch_size, topo.layout.replicas,
                                 cfg.run.seed, start_step=run.progress.step)
        stop: RunStopped | None = None
        wall0 = time.perf_counter()
        run.clock = StepClock(start=wall0)  # the log line's rates count from the first step
        with Watchdog(topo.world, cfg.run.step_timeout_s, Path(cfg.run.out_dir)) as watchdog:
            first = run.progress.step + 1
            for step in range(first, cfg.run.steps + 1):
                time_fraction = budget_spent(cfg, topo, started)  # collective when there is a budget
                if time_fraction >= 1.0 and step > first:
                    run.log(f"time budget run.max_seconds = {cfg.run.max_seconds:g} s spent after step {step - 1}: "
                            "stopping with the final checkpoint")
                    break
                watchdog.beat(f"step {step}")
                epoch, global_batch = next(batches)
                result = take_step(run, step, epoch, global_batch, watchdog, time_fraction)
                stop = decide(run, step, result, signals, watchdog)  # collective: the same answer on every rank
                if stop is not None:
                    break
            if stop is None:
                finish(run, time.perf_counter() - wall0, watchdog)
        run.perf.close()
        if run.metrics is not None:
            run.metrics.close()
        run.data.reader.close()
    if stop is not None:
        log(str(stop))
        raise stop
    return Path(cfg.run.out_dir)


def stop_during_start_up(signals: StopSignals, topo: Topology, when: str, log: Callable[[str], None]) -> None:
    """Collective: a scheduler signal that came before the first step ends the run at once with
    REQUEUE_EXIT_CODE. No step ran in this run, so there is nothing new to checkpoint; start-up
    (data index, calibration) can take longer than the scheduler's warning leaves."""
    signal_name = signals.agreed(topo)  # collective
    if signal_name:
        stop = RunStopped(f"signal {signal_name} received {when}: no step ran, nothing new to checkpoint; "
                          f"exiting {REQUEUE_EXIT_CODE} for requeue", REQUEUE_EXIT_CODE)
        log(str(stop))
        raise stop


def budget_spent(cfg: Config, topo: Topology, started: float) -> float:
    """The share of run.max_seconds spent since `started`, by rank 0's clock (collective: every rank
    then stops, and sets its learning rate, alike); 0 without a budget (no collective)."""
    if not cfg.run.max_seconds:
        return 0.0
    return topo.from_root(time.perf_counter() - started) / cfg.run.max_seconds


def replace_experts(run: Run, step: int, load: list[np.ndarray]) -> None:
    """Adds this step's world load per expert; every parallel.replace_experts_every steps the experts
    move to a placement balanced on the load since the last move, with parallel.expert_replicas
    spare slots per rank for replicas (the same on every rank: world counts)."""
    run.expert_load = [a + b for a, b in zip(run.expert_load, load)] if run.expert_load else load
    if step % run.cfg.parallel.replace_experts_every:
        return
    ep, layers, spare = run.topo.layout.ep, run.model.moe_layers, run.cfg.parallel.expert_replicas
    placements = [balanced_placement(x, ep, layer.placement, spare) for x, layer in zip(run.expert_load, layers)]
    before = max(max_over_mean(x, layer.placement, ep) for x, layer in zip(run.expert_load, layers))
    after = max(max_over_mean(x, new, ep) for x, new in zip(run.expert_load, placements))
    copies = sum(len(set(holders) - set(old)) for new, layer in zip(placements, layers)
                 for holders, old in zip(new, layer.placement))
    changed = any(new != layer.placement for new, layer in zip(placements, layers))
    run.expert_load = []
    if not changed:
        return
    sent = move_experts(run.model, placements, run.parallel.groups.ep, run.optimizer)  # collective over the EP group
    run.parallel.reduction.experts_moved(run.model)
    replicas = sum(len(holders) - 1 for new in placements for holders in new)
    run.log(f"step {step}: {copies} expert copies moved to balance the load since the last placement (worst "
            f"layer's max / mean over EP ranks {before:.3f} → {after:.3f}; {replicas} replica(s); rank 0 sent "
            f"{sent / 2**20:.3g} MiB)")


def take_step(run: Run, step: int, epoch: int, global_batch: np.ndarray, watchdog: Watchdog,
              time_fraction: float = 0.0) -> StepResult:
    """Collective: this rank's cost-balanced share of the global batch (its pipeline's) → one
    optimizer step → its perf record (with validation every run.val_every steps) and log line."""
    cfg, topo = run.cfg, run.topo
    replicas, mine = topo.layout.replicas, topo.layout.replica_index(topo.rank)
    t0 = time.perf_counter()
    shares = deal(global_batch, run.cost_G[global_batch], replicas, cfg.data.balance)
    n_micro = min(cfg.data.micro_batches, min(len(share) for share in shares))  # the same on every rank
    micro_batches = [run.data.batch(part) for part in np.array_split(shares[mine], n_micro)]
    loss_scale = replicas / len(global_batch)  # the mean over this step's global batch
    t_data = time.perf_counter() - t0
    lr = run.schedule.lr_at(step, time_fraction)
    result = train_step(run.model, micro_batches, run.optimizer, run.parallel, cfg, loss_scale, lr, run.average)
    run.optimizer.zero_grad(set_to_none=True)  # gradients do not outlive the step (validation, checkpoints)
    if not result.updated and cfg.run.nonfinite == "skip":
        run.progress.skipped_steps += 1
    times, loss_sums = result.times, result.loss_sums
    counts = {k: sum(b.counts()[k] for b in micro_batches) for k in micro_batches[0].counts()}
    times["data"] = t_data
    times["total"] = time.perf_counter() - t0
    share_cost = [float(run.cost_G[share].sum()) for share in shares]  # predicted seconds per share
    extra = {"cost": share_cost[mine], "cost_max_over_mean": max(share_cost) / max(np.mean(share_cost), 1e-30),
             "loss": result.loss, "grad_norm": result.grad_norm, "skipped_steps": run.progress.skipped_steps,
             "rss_bytes": resident_memory_bytes()}
    if topo.layout.pp > 1:
        extra["pp_stage"] = topo.stage  # the report counts structures and losses on first stages only
    work = counts
    if result.work is not None:  # graph parallelism: the report counts structures on each group's first rank
        extra.update(gp_index=topo.gp_index, gp_work=result.work)
        work = result.work
        if step == 1 or step % cfg.run.log_every == 0:  # as the step's log line
            log_partition(run, result.work)  # collective
    if run.device.type != "cpu":
        extra["device_peak_mem_bytes"] = device_peak_memory_bytes(run.device)
    if not result.updated:
        extra["skipped"] = True
    if result.offload is not None:
        extra.update(result.offload)
    if result.routings:
        extra.update(moe_aux=loss_sums.pop("moe_aux"), expert_load=expert_load(result.routings))
        if cfg.parallel.replace_experts_every:
            replace_experts(run, step, [np.asarray(x) for x in extra["expert_load"]["experts"]])  # collective
    if (cfg.run.val_every and step % cfg.run.val_every == 0) or step == cfg.run.steps:
        watchdog.beat(f"validation at step {step}")
        with run.average.averaged() if run.average is not None else nullcontext():  # what the checkpoint ships
            extra["val"] = validation_mae(run.model, run.data.index, run.data.batch, run.cost_G,
                                          max(1, len(global_batch) // replicas), run.parallel)  # collective
        for line in validation_log_lines(extra["val"]):
            run.log(line)
    run.perf.step(step=step, epoch=epoch, times=times, loss_sum=loss_sums,
                  flops=predict_flops(run.progress.flop_coefficients, work["atoms"], work["edges"], work["angles"]),
                  peak_mem_bytes=peak_memory_bytes(), lr=lr, extra=extra, **counts)
    # Collective: the step's world atoms (each pipeline's and GP group's once: its first rank's) and
    # per-term loss sums (first ranks hold them), for the log line and metrics.csv.
    atoms = counts["atoms"] if topo.stage == 0 and topo.gp_index == 0 else 0
    world = topo.sum(np.array([atoms, *(loss_sums.get(t, 0.0) for t in LOSS_TERMS)], dtype=np.float64))
    run.clock.tick(int(world[0]))
    if run.metrics is not None:
        run.metrics.row({"step": step, "epoch": epoch, "wall_s": time.perf_counter() - run.clock.start, "lr": lr,
                         "loss": result.loss, **{f"loss_{t}": float(v) / len(global_batch)
                                                 for t, v in zip(LOSS_TERMS, world[1:])},
                         "grad_norm": result.grad_norm, "atoms_per_s": run.clock.atoms_per_s()}, extra.get("val"))
    if step % cfg.run.log_every == 0 or step == 1 or step == cfg.run.steps:
        budget_left = (1.0 - time_fraction) * cfg.run.max_seconds if cfg.run.max_seconds else None
        run.log(f"{step_log_line(step, cfg.run.steps, result.loss, times['total'])}  "
                f"{run.clock.summary(cfg.run.steps - step, budget_left)}")
    return result


def log_partition(run: Run, work: dict[str, int]) -> None:
    """Collective: each rank's owned atoms and subgraph this step, on rank 0's log (graph parallelism;
    at step 1 and every run.log_every)."""
    rows = run.topo.gather_to_root((run.topo.rank, run.topo.gp_index, work))
    if rows is not None:
        run.log("graph partition: " + "; ".join(
            f"rank {rank} (gp {index}) owns {w['owned_atoms']} atoms, subgraph {w['atoms']} atoms/{w['edges']} bonds/"
            f"{w['angles']} triplets" for rank, index, w in rows))


def decide(run: Run, step: int, result: StepResult, signals: StopSignals, watchdog: Watchdog) -> RunStopped | None:
    """Collective: after step `step`, checkpoint when due, and stop on a non-finite step (run.nonfinite =
    "stop") or a scheduler signal. Every rank decides alike: the loss and the norm are global, signals agreed."""
    cfg, progress = run.cfg, run.progress
    if not result.updated:
        what = f"step {step}: non-finite loss ({result.loss:.6g}) or gradient norm ({result.grad_norm:.6g})"
        if cfg.run.nonfinite == "stop":
            watchdog.beat(f"checkpoint of step {progress.step}")
            return RunStopped(f"{what}: stopping (run.nonfinite = \"stop\"); the last good state (step "
                              f"{progress.step}) is in {run.checkpoints.save(progress)}; exiting {NONFINITE_EXIT_CODE}",
                              NONFINITE_EXIT_CODE)
        run.log(f"{what}: step skipped, no parameter update (run.nonfinite = \"skip\"; "
                f"{progress.skipped_steps} skipped so far)")
    progress.step = step
    if cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0:
        watchdog.beat(f"checkpoint of step {step}")
        run.checkpoints.save(progress)
    signal_name = signals.agreed(run.topo)  # collective: 8 bytes once a step, the whole cost of signals
    if signal_name:
        watchdog.beat(f"checkpoint of step {step}")
        return RunStopped(f"signal {signal_name} received at step {step}: checkpoint written to "
                          f"{run.checkpoints.save(progress)}; exiting {REQUEUE_EXIT_CODE} for requeue", REQUEUE_EXIT_CODE)
    return None


def finish(run: Run, wall_s: float, watchdog: Watchdog) -> None:
    """Collective: the perf log's end record, peak memory per rank, the final checkpoint and model file."""
    run.perf.end(steps=run.progress.step, wall_s=wall_s, skipped_steps=run.progress.skipped_steps)
    peaks = run.topo.gather_to_root((peak_memory_bytes(), device_peak_memory_bytes(run.device)))  # collective
    if run.topo.is_root:
        run.log("peak memory per rank (max RSS" + ("" if run.device.type == "cpu" else "; device") + "): " + ", ".join(
            f"{r}: {host / 2**30:.2f} GiB" + ("" if run.device.type == "cpu" else f"; {device / 2**30:.2f} GiB")
            for r, (host, device) in enumerate(peaks)))
    if run.cfg.run.final_checkpoint:
        watchdog.beat("final checkpoint")
        folder = run.checkpoints.save(run.progress)
        run.log(f"checkpoint: {folder}; model: {run.checkpoints.export_model()}")  # collective
