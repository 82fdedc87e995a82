"""`exaforce bench pp`: pipeline schedules measured on real ranks, then replayed by the simulator.

Per (pp, schedule) one `mpiexec -n pp` worker runs the trainer's own `train_step` through a
pipeline of pp stages on the same global batch and micro-batches (dense cells by default), and
reports per rank: the median step time, the last step's op timeline (`PipelineStage.timeline`:
each op's start, end and time waiting for its message), the true peak RSS from the process start
and the RSS before any step (the difference is the step's memory). pp = 1 is the same step without
a pipeline: its memory is the reference for the per-rank bound.

From the timelines: per stage and phase the mean work of an op (duration − wait), the measured
bubble fraction 1 − Σ work / (pp · makespan), and the phases' relative costs, which the simulator
(exaforce.parallel.pipeline_schedule.simulate) replays for equal stages at pp = 8 … 64.

On a machine with fewer cores than pp · threads the ranks share cores and the measured times mix
in that contention (the output says how many cores there were).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Callable

from exaforce.bench.step import START_RSS_BYTES, _vm_rss_bytes  # noqa: F401  (first: the start RSS)

Log = Callable[[str], None]


def pp_worker(pp: int, preset: str, workload: str, batch: int, micro_batches: int, schedule: str, chunks: int,
              alive: int, dtype: str, warmup: int, repeats: int, blocks: int) -> None:
    """One (pp, schedule) measurement on pp ranks; rank 0 prints the JSON record."""
    import numpy as np
    import torch

    from exaforce.bench import BENCH_SEED
    from exaforce.bench.workloads import workload_structures
    from exaforce.comm.groups import build_groups
    from exaforce.config import DTYPES, Config, DataConfig, ParallelConfig, RunConfig, model_preset
    from exaforce.graph import build_batch
    from exaforce.io.schema import Frames
    from exaforce.model.potential import Potential
    from exaforce.parallel.parallelize import parallelize
    from exaforce.parallel.topology import Topology
    from exaforce.training.progress import peak_memory_bytes
    from exaforce.training.schedule import make_optimizer
    from exaforce.training.step import train_step

    model_cfg = model_preset(preset)
    if blocks:
        model_cfg = dataclasses.replace(model_cfg, blocks=blocks)
    cfg = Config(run=RunConfig(steps=warmup + repeats, dtype=dtype), model=model_cfg,
                 data=DataConfig(train=("bench",), global_batch_size=batch, micro_batches=micro_batches),
                 parallel=ParallelConfig(pp=pp, pp_schedule=schedule, pp_alive=alive, pp_chunks=chunks))
    topo = Topology.from_mpi(pp=pp)
    torch.manual_seed(BENCH_SEED)
    model = Potential(cfg.model).to(dtype=DTYPES[dtype])
    parallel = parallelize(model, topo, build_groups("mpi", topo), cfg)
    optimizer, lr_schedule = make_optimizer(model, cfg)
    frames = Frames.from_atoms(workload_structures(workload, batch, BENCH_SEED))
    micro = [build_batch(frames.select(part), model.species_table(), cfg.model.cutoff,
                         cfg.model.three_body_cutoff).to("cpu", DTYPES[dtype])
             for part in np.array_split(np.arange(batch), micro_batches)]
    baseline = _vm_rss_bytes()  # nothing has stepped yet
    seconds = []
    for step in range(1, warmup + repeats + 1):
        topo.barrier()  # every stage starts the step together: the timelines share an origin
        t0 = time.perf_counter()
        train_step(model, micro, optimizer, parallel, cfg, 1.0 / batch, lr_schedule.lr_at(step))
        seconds.append(time.perf_counter() - t0)
    peak = peak_memory_bytes()
    timeline = [] if parallel.pipeline is None else \
        [[t.op.phase, t.op.micro, t.start, t.end, t.waited] for t in parallel.pipeline.timeline]
    rows = topo.gather_to_root({"stage": topo.stage, "step_s": statistics.median(seconds[warmup:]),
                                "baseline_rss_bytes": baseline, "peak_rss_bytes": peak, "timeline": timeline})
    if topo.is_root:
        atoms = sum(int(b.species_N.shape[0]) for b in micro)
        print(json.dumps({"pp": pp, "schedule": schedule if pp > 1 else "none", "chunks": chunks, "atoms": atoms,
                          "ranks": sorted(rows, key=lambda r: r["stage"])}))


def phase_work(timeline: list[list[float]]) -> dict[int, float]:
    """Mean work (duration − wait) of one op per phase on one stage."""
    work: dict[int, list[float]] = {}
    for phase, _micro, start, end, waited in timeline:
        work.setdefault(int(phase), []).append(end - start - waited)
    return {phase: statistics.mean(values) for phase, values in sorted(work.items())}


def measured_bubble(ranks: list[dict]) -> float:
    """1 − Σ over stages of their ops' work / (pp · the pipeline's makespan), from the timelines."""
    span = max(op[3] for r in ranks for op in r["timeline"]) - min(op[2] for r in ranks for op in r["timeline"])
    work = sum(op[3] - op[2] - op[4] for r in ranks for op in r["timeline"])
    return 1.0 - work / (len(ranks) * span)


INTERLEAVED = (2, 3, 4, 8)  # stages per rank the simulator tries, up to MAX_SIMULATED_STAGES stages in all
MAX_SIMULATED_STAGES = 64    # list scheduling of more stages than this gets slow in Python


def simulated(costs: tuple[float, ...], points: list[tuple[int, int]]) -> list[dict]:
    """gpipe against folded on equal stages with the measured relative phase costs, at each (pp,
    micro-batches): contiguous stages with the bound on live micro-batches chosen by simulation, and
    interleaved stages (up to MAX_SIMULATED_STAGES in all) with every micro-batch admitted and with pp + 1
    (the bound that keeps memory within 1/pp of pp = 1 plus one micro-batch's graph)."""
    from exaforce.parallel.pipeline_schedule import choose_alive, folded, gpipe, lower_bound, simulate

    rows = []
    for pp, m in points:
        base = simulate(gpipe(pp, m), costs)
        variants = [(1, choose_alive(pp, m, costs))]
        variants += [(v, k) for v in INTERLEAVED if pp * v <= MAX_SIMULATED_STAGES
                     for k in sorted({m, min(pp + 1, m)}, reverse=True)]
        for chunks, alive in variants:
            ours = simulate(folded(pp, m, alive, costs, chunks), costs, chunks)
            rows.append({"pp": pp, "micro_batches": m, "chunks": chunks, "gpipe_bubble": base.bubble,
                         "folded_bubble": ours.bubble, "folded_alive": alive,
                         "folded_peak_alive": max(ours.peak_alive(r) for r in range(pp)), "gpipe_peak_alive": m,
                         "throughput_ratio": base.makespan / ours.makespan,
                         "best_possible_ratio": base.makespan / lower_bound(pp, m, costs, chunks)})
    return rows


def schedule_charts(costs: tuple[float, ...], pp: int, micro_batches: int, chunks: int = 3) -> str:
    """gpipe's and folded's simulated timelines at (pp, micro_batches), contiguous and with `chunks`
    stages per rank, to read the bubble off."""
    from exaforce.parallel.pipeline_schedule import choose_alive, folded, gpipe, simulate

    base = simulate(gpipe(pp, micro_batches), costs)
    alive = choose_alive(pp, micro_batches, costs)
    ours = simulate(folded(pp, micro_batches, alive, costs), costs)
    interleaved = simulate(folded(pp, micro_batches, micro_batches, costs, chunks), costs, chunks)
    width = 72
    return (f"simulated, pp = {pp}, {micro_batches} micro-batches (digit: the phase running, '.': idle)\n"
            f"gpipe:\n{base.chart(width)}\nfolded, at most {alive} alive:\n"
            f"{ours.chart(round(width * ours.makespan / base.makespan))}\n"
            f"folded, {chunks} stages per rank, every micro-batch admitted:\n"
            f"{interleaved.chart(round(width * interleaved.makespan / base.makespan))}")


def bench_pp(preset: str, workload: str, batch: int, micro_batches: int, stages: list[int], schedules: list[str],
             chunk_counts: list[int], alive: int, dtype: str, warmup: int, repeats: int, blocks: int,
             simulate_stages: list[int], log: Log) -> dict:
    from exaforce.bench.launcher import environment, launch_json, module_command, on_ranks

    env = environment(OMP_NUM_THREADS="1")
    results: dict = {"preset": preset, "blocks": blocks, "workload": workload, "batch": batch,
                     "micro_batches": micro_batches, "dtype": dtype, "warmup": warmup, "repeats": repeats,
                     "cores": os.cpu_count(), "threads_per_rank": env["OMP_NUM_THREADS"], "runs": []}

    def run(pp: int, schedule: str, chunks: int = 1) -> dict:
        label = f"{schedule}, {chunks} stages per rank" if chunks > 1 else schedule
        log(f"bench pp: pp = {pp}, schedule {label if pp > 1 else '-'} ...")
        command = module_command("exaforce.bench.pp", str(pp), preset, workload, str(batch), str(micro_batches), schedule,
                                 str(chunks), str(alive), dtype, str(warmup), str(repeats), str(blocks))
        record = launch_json(on_ranks(pp, command), f"bench pp worker (pp = {pp}, {label})", env)
        ranks = record["ranks"]
        record["step_s"] = max(r["step_s"] for r in ranks)
        record["step_mem_gib_per_rank"] = [(r["peak_rss_bytes"] - r["baseline_rss_bytes"]) / 2**30 for r in ranks]
        record["peak_gib_per_rank"] = [r["peak_rss_bytes"] / 2**30 for r in ranks]
        if pp > 1:
            record["phase_work_s"] = [phase_work(r["timeline"]) for r in ranks]
            record["bubble"] = measured_bubble(ranks)
        for r in ranks:
            r.pop("timeline")
        results["runs"].append(record)
        extra = f", measured bubble {record['bubble']:.3f}" if pp > 1 else ""
        log(f"  step {record['step_s']:.2f} s ({record['atoms']} atoms), step memory per rank "
            f"{', '.join(f'{g:.2f}' for g in record['step_mem_gib_per_rank'])} GiB{extra}")
        return record

    reference = run(1, "gpipe")
    for pp in stages:
        by_schedule = {(name, chunks): run(pp, name, chunks) for name in schedules
                       for chunks in (chunk_counts if name == "folded" else [1])}
        for (name, chunks), record in by_schedule.items():
            if name == "folded" and ("gpipe", 1) in by_schedule:
                log(f"  pp = {pp}: folded ({chunks} stage(s) per rank) / gpipe step time = "
                    f"{record['step_s'] / by_schedule[('gpipe', 1)]['step_s']:.3f}")
    # The phases' relative costs, from the largest measured pipeline (mean over its ranks and schedules; an
    # op on interleaved stages is 1/chunks of a rank's work, so it counts chunks times).
    largest = [r for r in results["runs"] if r["pp"] == max(stages)]
    per_phase = {p: statistics.mean(w[p] * r["chunks"] for r in largest for w in r["phase_work_s"] if p in w)
                 for p in (1, 2, 3, 4)}
    costs = tuple(per_phase[p] / per_phase[1] for p in (1, 2, 3, 4))
    results["relative_phase_costs"] = costs
    log(f"relative phase costs (phase 1 = 1): {', '.join(f'{c:.2f}' for c in costs)}")
    points = [(pp, 2 * pp) for pp in simulate_stages]
    results["simulated"] = simulated(costs, points + [(8, 16)] * ((8, 16) not in points))
    for row in results["simulated"]:
        log(f"  simulated pp = {row['pp']:>2}, {row['micro_batches']:>3} micro-batches, {row['chunks']} stage(s) per "
            f"rank: bubble gpipe {row['gpipe_bubble']:.3f}, folded {row['folded_bubble']:.3f} (≤ "
            f"{row['folded_alive']} alive per rank, peak {row['folded_peak_alive']:.2f}; gpipe "
            f"{row['gpipe_peak_alive']}); throughput folded / gpipe "
            f"{row['throughput_ratio']:.3f} (no schedule on these stages beats gpipe by more than "
            f"{row['best_possible_ratio']:.3f}×)")
    log(schedule_charts(costs, 8, 16))
    results["pp1_step_mem_gib"] = reference["step_mem_gib_per_rank"][0]
    return results


if __name__ == "__main__":  # worker: pp preset workload batch micro schedule chunks alive dtype warmup repeats blocks
    stages, preset_name, workload_name, n, m, schedule_name, v, k, dt, w, r, b = sys.argv[1:13]
    pp_worker(int(stages), preset_name, workload_name, int(n), int(m), schedule_name, int(v), int(k), dt, int(w),
              int(r), int(b))
