"""Start-up calibration: FLOPs and seconds of a training step as c0 + c_a·atoms + c_e·edges + c_t·angles.

The FLOP coefficients turn each step's counts into FLOPs for the perf log (FlopCounterMode is exact
for matmul-bound models: FLOPs are linear in the counts); the cost coefficients are what the
sampler deals structures by. All ranks calibrate together, once per layout (a resumed run reuses
the checkpoint's).

With pipeline stages (parallel.pp > 1) every stage of a pipeline takes the same calibration batches
and runs its part of the step through the pipeline (PipelineStage.run, one micro-batch). The FLOP
coefficients are then this rank's stage's: the FLOPs its ops execute (its blocks, the embeddings and
the loss on the first stage, the readout on the last, and phase 3's extra force-backward pass), fitted
to the mean over the stage's replicas, so the perf log's FLOPs summed over ranks are the work the
job does. The cost coefficients are the pipeline's step time, fitted to the world mean like
without stages: every rank deals alike.

Why a cache: the twelve calibration steps cost tens of seconds (the default model on 2 ranks: about
40 s, a twentieth of a 15-minute run), and they measure the model, not the data: the coefficients
depend on the model config, the step's path, dtype, layout, threads and machine. Rank 0 keeps them
in `run.calibration_cache` (default $XDG_CACHE_HOME/exaforce/calibration, else ~/.cache/…) under a
hash of those, and a later run that matches every one of them reuses them; a degenerate fit (too few
distinct structures) is never cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from exaforce.config import Config
from exaforce.graph import GraphBatch
from exaforce.model.potential import Potential
from exaforce.model.routing import Routing
from exaforce.parallel.graph_parallel import resolve_halo
from exaforce.parallel.parallelize import Parallel
from exaforce.perf.flops import count_flops, fit_flop_coefficients, fit_in_span
from exaforce.training.data import GlobalIndex
from exaforce.training.step import loss_and_gradients, step_plan

Coefficients = dict[str, float]


def _forward_and_backward(model: Potential, batch: GraphBatch, cfg: Config, parallel: Parallel,
                          routing: Routing | None) -> object:
    """One training step's forward and backward on `batch` (gradients accumulate; no reduction, no
    update): on this rank, or this rank's stage of it (collective over the pipeline)."""
    if parallel.pipeline is None:
        return loss_and_gradients(model, batch, cfg, 1.0, {}, routing)
    return parallel.pipeline.run([batch], [routing], [step_plan(model, batch, cfg)], 1.0, {},
                                 routing.counts.world_2C if routing is not None else None)


def _measured_step(model: Potential, batch: GraphBatch, cfg: Config,
                   parallel: Parallel) -> tuple[Callable[[], object], dict[str, int]]:
    """The step a calibration measures on this rank, and the counts of the work it does: the whole
    batch, or with graph parallelism this rank's subgraph of it (collective: the routing plan)."""
    if parallel.graph is None:
        routing = parallel.routing(model, batch)
        return (lambda: _forward_and_backward(model, batch, cfg, parallel, routing)), batch.counts()
    part = parallel.graph.shard(batch)
    routing = parallel.routing(model, part.local, part.owned_2C)
    plan = step_plan(model, part.local, cfg)
    return (lambda: parallel.graph.loss_and_gradients(model, part, cfg.loss, 1.0, routing, plan, None, {})), \
        part.local.counts()


def _fit_world_mean(model: Potential, batches: list[GraphBatch], cfg: Config, parallel: Parallel,
                    measure: Callable[[Callable[[], object]], float],
                    log: Callable[[str], None], over_stage: bool = False) -> tuple[Coefficients, bool]:
    """Runs one training step's forward and backward per calibration batch through `measure` (FLOPs
    or seconds) and fits the coefficients to the world means (collective: every rank runs the same
    number of steps on its own batches; with expert parallelism an expert's work depends on every
    rank's tokens, so the coefficients predict a rank's share of the step). `over_stage`: the means
    over this rank's stage instead (pipeline: the FLOPs of the stage's part of the step)."""
    topo = parallel.topo
    samples = []
    for batch in batches:
        step, c = _measured_step(model, batch, cfg, parallel)
        value = measure(step)
        samples.append((c["atoms"], c["edges"], c["angles"], float(value)))
    model.zero_grad(set_to_none=True)
    if over_stage:
        mean = np.asarray(topo.stage_sum(np.asarray(samples))) / topo.layout.replicas  # collective
    else:
        mean = np.asarray(topo.sum(np.asarray(samples))) / topo.world_size  # collective
    rows = [tuple(row) for row in mean]
    try:
        return fit_flop_coefficients(rows), True
    except ValueError as err:  # too few distinct structures to vary the counts independently
        log(f"calibration: {err}; using the fit within the counts the training set spans (perf figures of "
            f"other batch shapes are extrapolated)")
        return fit_in_span(rows), False


def calibrate(model: Potential, index: GlobalIndex, to_batch: Callable[[np.ndarray], GraphBatch], cfg: Config,
              parallel: Parallel, log: Callable[[str], None]) -> tuple[Coefficients, Coefficients]:
    """(FLOP, cost) coefficients from six calibration steps per rank on batches of 1 to 5 of its
    structures (its pipeline's, with pipeline stages). The FLOP coefficients are this rank's stage's
    with pipeline stages (a cache entry holds one set per stage)."""
    topo = parallel.topo
    layout = topo.layout
    mine = np.flatnonzero(~index.is_val_G)[layout.replica_index(topo.rank)::layout.replicas]
    batches = [to_batch(mine[np.arange(i, i + k) % len(mine)])
               for i, k in ((0, 1), (1, 2), (3, 3), (6, 4), (10, 2), (12, 5))]
    cfg = on_training_path(cfg, model, index, layout.replicas)
    cache = cache_entry(cfg, model, topo)
    cached = topo.from_root(_read(*cache, log) if topo.is_root and cache is not None else None)  # collective
    if cached is not None:
        log(f"calibration: reused {cache[0]} (same model, path, dtype, layout, threads and machine; delete it "
            f"to measure again)")
        flops, cost = cached
        return (flops[topo.stage] if layout.pp > 1 else flops), cost
    t0 = time.perf_counter()
    flop_coefficients, determined = calibrate_flops(model, batches, cfg, parallel, log)
    t1 = time.perf_counter()
    cost_coefficients = calibrate_cost(model, batches, cfg, parallel, flop_coefficients, log)
    log(f"calibration: {t1 - t0:.1f} s counting FLOPs, {time.perf_counter() - t1:.1f} s timing steps")
    per_rank = topo.gather_to_root(flop_coefficients) if layout.pp > 1 else None  # collective: every stage's
    if topo.is_root and cache is not None and determined:  # both fits share the counts: one verdict
        flops = [per_rank[r] for r in layout.pp_group(0)] if layout.pp > 1 else flop_coefficients
        _write(*cache, flops, cost_coefficients, log)
    return flop_coefficients, cost_coefficients


# ---------------------------------------------------------------- the cache
def cache_entry(cfg: Config, model: Potential, topo) -> tuple[Path, dict] | None:
    """The cache file of this calibration and what the coefficients depend on (None: run.calibration_cache
    = ""); the file is named by a hash of the description, which it also holds and is checked against."""
    if not cfg.run.calibration_cache:
        return None
    root = cfg.run.calibration_cache
    if root == "auto":
        root = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "exaforce" / "calibration")
    key = json.loads(json.dumps(cache_key(cfg, model, topo), default=str))  # as it reads back from JSON
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(root).expanduser() / f"{digest}.json", key


def cache_key(cfg: Config, model: Potential, topo) -> dict:
    from exaforce import __version__

    device = next(model.parameters()).device
    return {"model": dataclasses.asdict(model.cfg), "dtype": cfg.run.dtype,
            "path": {"recompute_lines": cfg.run.recompute_lines, "recompute_bonds": cfg.run.recompute_bonds,
                     "store_all_below": cfg.run.store_all_below},
            "layout": topo.describe(), "threads": torch.get_num_threads(), "device": str(device.type),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
            "host_arch": platform.machine(), "torch": torch.__version__, "exaforce": __version__,
            **({"pp_split": list(cfg.parallel.pp_split), "pp_chunks": cfg.parallel.pp_chunks}
               if topo.layout.pp > 1 else {}),
            **({"gp_min_atoms": cfg.parallel.gp_min_atoms, "gp_halo": resolve_halo(cfg.parallel.gp_halo, model.cfg.block)} if topo.layout.gp > 1 else {})}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def _read(path: Path, key: dict, log: Callable[[str], None]) -> tuple[Coefficients, Coefficients] | None:
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
        if entry["key"] != key:
            return None
        flops = entry["flops"]  # pipeline stages: one set per stage
        return [dict(f) for f in flops] if isinstance(flops, list) else dict(flops), dict(entry["cost"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        log(f"calibration: WARNING: ignoring the unreadable cache entry {path} ({type(err).__name__}: {err})")
        return None


def _write(path: Path, key: dict, flops: Coefficients | list[Coefficients], cost: Coefficients,
           log: Callable[[str], None]) -> None:
    """Best effort: a cache that cannot be written costs the next run its calibration, nothing else."""
    from exaforce.io.atomic import DiskFullError, write_file_atomically

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"key": key, "flops": flops, "cost": cost}, indent=1)
        write_file_atomically(path, lambda f: f.write(text.encode()))
    except (OSError, DiskFullError) as err:
        log(f"calibration: WARNING: could not write the cache entry {path} ({getattr(err, 'strerror', None) or err})")


def on_training_path(cfg: Config, model: Potential, index: GlobalIndex, replicas: int) -> Config:
    """The config with run.store_all_below set so that the small calibration batches take the path
    (plain or fused) that a typical training micro-batch takes (step_plan), so the FLOP and cost
    coefficients describe the work the steps do. `replicas`: the shares a global batch is dealt into."""
    per_micro = cfg.data.global_batch_size / (replicas * cfg.data.micro_batches)
    angles = float(index.counts_G3[~index.is_val_G, 2].mean()) if index.n_train else 0.0
    plain = angles * per_micro * model.cfg.line_channels_per_triplet < cfg.run.store_all_below
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, store_all_below=2**62 if plain else 0))


def calibrate_flops(model: Potential, batches: list[GraphBatch], cfg: Config, parallel: Parallel,
                    log: Callable[[str], None]) -> tuple[Coefficients, bool]:
    """FLOPs of one training step (forward, force backward, parameter backward) from FlopCounterMode, and
    whether the calibration batches' counts determined them (False: a fit within their span)."""
    return _fit_world_mean(model, batches, cfg, parallel, count_flops, log, over_stage=parallel.pipeline is not None)


def calibrate_cost(model: Potential, batches: list[GraphBatch], cfg: Config, parallel: Parallel,
                   flop_coefficients: Coefficients, log: Callable[[str], None]) -> Coefficients:
    """Seconds of a step from timed steps. A noisy fit with a negative slope (the same verdict on
    every rank: a fit of world means) falls back to the FLOP coefficients, which are proportional to
    the work: with pipeline stages the pipeline's, summed over its stages, so that every rank deals alike."""
    def seconds_of(step: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        step()
        return time.perf_counter() - t0

    seconds, _ = _fit_world_mean(model, batches, cfg, parallel, seconds_of, log)
    if min(seconds["atoms"], seconds["edges"], seconds["angles"]) < 0:
        if parallel.pipeline is None:
            return flop_coefficients
        summed = parallel.topo.pp_sum(np.array(list(flop_coefficients.values())))  # collective over the pipeline
        return dict(zip(flop_coefficients, map(float, summed)))
    return seconds
