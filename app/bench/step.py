"""`exaforce bench step`: the full training step's speed, memory and FLOP/s, optionally beside MatRIS.

The step is the trainer's own: `exaforce.training.step.train_step` on a one-rank topology, with
the run's optimizer, schedule, clipping and gradient reduction (over one rank: no communication).
Each model is measured in its own subprocess, so one model's peak memory never hides the
other's. Peak memory is the growth of the process's peak RSS over its RSS just before the first
step: the step's own working set (activations, double-backward graph, optimizer state), the
CPU analogue of torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from typing import Callable

import torch

from exaforce.bench import BENCH_SEED
from exaforce.bench.launcher import environment, launch_json, module_command

# glibc malloc settings for both workers alike: keep freed memory in the heap instead of returning
# it to the kernel, because fresh pages are slow to come by on these VMs (measured on the base
# preset, 2 cores: 1.78 s → 1.70 s per step). A value already in the environment wins.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**36),
              "MALLOC_TOP_PAD_": str(2**28)}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _time_steps(step: Callable[[], None], warmup: int, repeats: int) -> tuple[float, int]:
    """Median seconds per step after warm-up, and the step's peak memory growth in bytes."""
    baseline = _rss_bytes()
    for _ in range(warmup):
        step()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds), max(_peak_rss_bytes() - baseline, 0)


def bench_structures(batch: int):
    """The benchmark's structures: `exaforce data synth` with seed 0, EMT labels."""
    from exaforce.io.synth import synthesize

    return synthesize(batch, seed=BENCH_SEED)


def exaforce_worker(preset: str, batch: int, dtype: str, warmup: int, repeats: int) -> dict:
    """The trainer's step (exaforce.training.step.train_step) on one rank, timed and FLOP-counted."""
    from exaforce.comm.groups import build_groups
    from exaforce.config import DTYPES, Config, DataConfig, RunConfig, model_preset
    from exaforce.graph import build_batch
    from exaforce.io.schema import Frames
    from exaforce.model.potential import Potential
    from exaforce.parallel.parallelize import parallelize
    from exaforce.parallel.topology import Topology
    from exaforce.perf.flops import count_flops
    from exaforce.training.schedule import make_optimizer
    from exaforce.training.step import train_step

    atoms = bench_structures(batch)
    steps = 1 + warmup + repeats  # the FLOP count's step, then the timed ones: the schedule spans them all
    cfg = Config(run=RunConfig(steps=steps, dtype=dtype), model=model_preset(preset),
                 data=DataConfig(train=("bench",), global_batch_size=batch))
    torch.manual_seed(BENCH_SEED)
    model = Potential(cfg.model).to(DTYPES[dtype])
    topo = Topology.single_process()
    parallel = parallelize(model, topo, build_groups(cfg.comm.backend, topo), cfg)
    optimizer, schedule = make_optimizer(model, cfg)  # after parallelize, as the trainer does
    graph = build_batch(Frames.from_atoms(atoms), model.species_table(), cfg.model.cutoff,
                        cfg.model.three_body_cutoff).to("cpu", DTYPES[dtype])
    counts = graph.counts()
    taken = 0

    def step() -> None:
        nonlocal taken
        taken += 1
        train_step(model, [graph], optimizer, parallel, cfg, 1.0 / batch, schedule.lr_at(taken))  # 1 / global batch

    flops = count_flops(step)
    seconds, peak = _time_steps(step, warmup, repeats)
    return {"model": "exaforce", "preset": preset, "params": sum(p.numel() for p in model.parameters()),
            "width": cfg.model.width, "blocks": cfg.model.blocks, "cutoff": cfg.model.cutoff,
            "three_body_cutoff": cfg.model.three_body_cutoff, "step_s": seconds, "flops": flops,
            "peak_mem_bytes": peak, **counts}


def matris_worker(preset: str, batch: int, dtype: str, warmup: int, repeats: int) -> dict:
    """The MatRIS reference's training step at the preset's width, depth and cutoffs, timed alike."""
    from exaforce.bench.reference import build_matris, make_matris_step, matris_param_count
    from exaforce.config import DTYPES, model_preset

    cfg = model_preset(preset)
    atoms = bench_structures(batch)
    model = build_matris(cfg.width, cfg.blocks, cfg.cutoff, cfg.three_body_cutoff, DTYPES[dtype], seed=BENCH_SEED)
    step = make_matris_step(model, atoms,
                            energies=[a.get_potential_energy() for a in atoms],
                            forces=[a.get_forces() for a in atoms],
                            stresses=[a.get_stress() for a in atoms])
    seconds, peak = _time_steps(step, warmup, repeats)
    return {"model": "matris", "params": matris_param_count(model), "width": cfg.width, "blocks": cfg.blocks,
            "cutoff": cfg.cutoff, "three_body_cutoff": cfg.three_body_cutoff, "step_s": seconds,
            "peak_mem_bytes": peak, "structures": batch, "atoms": sum(len(a) for a in atoms)}


WORKERS = {"exaforce": exaforce_worker, "matris": matris_worker}


def run_worker(model: str, preset: str, batch: int, dtype: str, warmup: int, repeats: int) -> dict:
    """One model's measurement in a fresh Python process; its last stdout line is JSON."""
    command = module_command("exaforce.bench.step", model, preset, str(batch), dtype, str(warmup), str(repeats))
    return launch_json(command, f"bench worker for {model}", environment(**MALLOC_ENV))


def bench_step(preset: str, batch: int, dtype: str, warmup: int, repeats: int, compare: str | None,
               log: Callable[[str], None]) -> dict:
    from exaforce.perf.machines import local_machine

    log(f"bench step: preset {preset}, batch {batch} (synth seed {BENCH_SEED}), {dtype}, "
        f"{warmup} warm-up + {repeats} timed steps, {torch.get_num_threads()} thread(s)")
    ours = run_worker("exaforce", preset, batch, dtype, warmup, repeats)
    peak = local_machine(getattr(torch, dtype))["peak_flops_per_s"]
    result = {
        "preset": preset, "params": ours["params"], "batch": batch, "atoms": ours["atoms"],
        "edges": ours["edges"], "angles": ours["angles"], "step_s": ours["step_s"],
        "atoms_per_s": ours["atoms"] / ours["step_s"], "structures_per_s": batch / ours["step_s"],
        "peak_mem_bytes": ours["peak_mem_bytes"], "flops_per_step": ours["flops"],
        "flops_per_s": ours["flops"] / ours["step_s"], "peak_flops_per_s": peak, "reference": None,
    }
    log(f"exaforce  {ours['params']:>12,} params  {result['step_s'] * 1e3:9.1f} ms/step  "
        f"{result['atoms_per_s']:9.1f} atoms/s  {result['structures_per_s']:7.2f} structures/s  "
        f"peak mem {result['peak_mem_bytes'] / 2**20:8.1f} MiB  "
        f"{result['flops_per_s'] / 1e9:.2f} GFLOP/s = {100 * result['flops_per_s'] / peak:.1f}% of "
        f"the local matmul peak {peak / 1e9:.1f} GFLOP/s")
    if compare:
        ref = run_worker(compare, preset, batch, dtype, warmup, repeats)
        result["reference"] = {"model": compare, "params": ref["params"], "step_s": ref["step_s"],
                               "atoms_per_s": ref["atoms"] / ref["step_s"], "peak_mem_bytes": ref["peak_mem_bytes"]}
        log(f"{compare:<9} {ref['params']:>12,} params  {ref['step_s'] * 1e3:9.1f} ms/step  "
            f"{result['reference']['atoms_per_s']:9.1f} atoms/s  peak mem {ref['peak_mem_bytes'] / 2**20:8.1f} MiB")
        log(f"speed-up {result['atoms_per_s'] / result['reference']['atoms_per_s']:.2f}x, "
            f"memory ratio {result['peak_mem_bytes'] / max(ref['peak_mem_bytes'], 1):.3f}")
    return result


if __name__ == "__main__":  # worker entry: model preset batch dtype warmup repeats
    name, preset_name, n, dt, w, r = sys.argv[1:7]
    print(json.dumps(WORKERS[name](preset_name, int(n), dt, int(w), int(r))))
