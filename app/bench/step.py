"""`exaforce bench step`: the full training step's speed, memory and FLOP/s, optionally beside MatRIS.

The step is the trainer's own: `exaforce.training.step.train_step` on a one-rank topology, with
the run's optimizer, schedule, clipping and gradient reduction (over one rank: no communication).
Every (model, batch size) pair is measured in its own worker process under an address-space cap
(RLIMIT_AS), so one measurement's peak never mixes with another's and a batch that does not fit
is reported as out of memory instead of taking the machine down.

What a worker measures, in this order (DESIGN.md §6, "Benchmarks tell the truth"):
1. `start_rss_bytes`: VmRSS as the worker's code starts (before torch is imported).
2. Setup: structures, model, optimizer, and the batch's graphs, built once, outside any timed
   step, for every model alike (`graph_build_s_per_structure`: exaforce's `build_batch`, MatRIS's
   own converter).
3. `baseline_rss_bytes`: VmRSS after setup and before any step of any kind. AdamW allocates its
   moments lazily, so they (2 × params × dtype size) are part of the step's memory.
4. Warm-up and timed steps; `step_s` is the median timed step.
5. `peak_rss_bytes` (= `peak_mem_bytes`): ru_maxrss, the process's true peak RSS from its start,
   read right after the timed steps; `step_mem_bytes` = peak − baseline.
6. The FLOP count (exaforce only): one more step under torch's FlopCounterMode, after the peak
   was read, so neither its own overhead nor its timing enters the numbers above.
The CPU analogue of torch.cuda.max_memory_allocated is the process's peak RSS; no malloc tuning
is set, since keeping freed pages in the heap would move the peak.
"""

from __future__ import annotations

import resource


def _vm_rss_bytes() -> int:
    """This process's resident set now (/proc/self/status VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmRSS line")


START_RSS_BYTES = _vm_rss_bytes()  # first thing on import: the worker's RSS at its start, before torch

import json  # noqa: E402  (after the start RSS on purpose)
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from functools import partial  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from exaforce.bench import BENCH_SEED  # noqa: E402
from exaforce.bench.launcher import STDERR_TAIL, environment, module_command  # noqa: E402
from exaforce.bench.workloads import workload_structures  # noqa: E402
from exaforce.config import RunConfig  # noqa: E402
from exaforce.training.progress import peak_memory_bytes  # noqa: E402

DENSE_BATCHES = (1, 2, 4, 8)
SMALL_BATCH = 4
MEM_LIMIT_GIB = 20.0
# What a process that hit its RLIMIT_AS says on the way out (Python, PyTorch's allocator, C++, ld.so).
OOM_PATTERN = re.compile(r"MemoryError|can't allocate memory|Cannot allocate memory|bad_alloc|"
                         r"failed to map segment|out of memory", re.IGNORECASE)


def _measure(step: Callable[[], None], warmup: int, repeats: int, device: torch.device = torch.device("cpu")) -> dict:
    """Baseline, warm-up, timed steps, true peak: the memory and time fields of a worker's record.
    On an accelerator each timed step ends with a synchronisation (its kernels have run), and the
    device's peak allocation since the process started is reported beside the host's peak RSS."""
    from exaforce.device import device_peak_memory_bytes

    def synchronise() -> None:
        if device.type != "cpu":
            torch.accelerator.synchronize(device)

    baseline = _vm_rss_bytes()  # nothing has stepped yet
    device_baseline = device_peak_memory_bytes(device)
    for _ in range(warmup):
        step()
    synchronise()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        synchronise()
        seconds.append(time.perf_counter() - t0)
    peak = peak_memory_bytes()  # ru_maxrss: the process's true peak since it started
    record = {"step_s": statistics.median(seconds), "start_rss_bytes": START_RSS_BYTES,
              "baseline_rss_bytes": baseline, "peak_rss_bytes": peak, "peak_mem_bytes": peak,
              "step_mem_bytes": peak - baseline, "device": str(device)}
    if device.type != "cpu":
        record.update(device_peak_mem_bytes=device_peak_memory_bytes(device), device_baseline_bytes=device_baseline)
    return record


def exaforce_worker(preset: str, workload: str, batch: int, dtype: str, warmup: int, repeats: int,
                    recompute_lines: int = RunConfig().recompute_lines,
                    recompute_bonds: bool = RunConfig().recompute_bonds,
                    release_host_memory: bool = RunConfig().release_host_memory, name: str = "exaforce",
                    device: str = "cpu") -> dict:
    """The trainer's step (exaforce.training.step.train_step) on one rank, timed, then FLOP-counted;
    run.recompute_lines and run.recompute_bonds as in training (their defaults), or 0 for the
    stored path ("store"), or bonds false ("sums"), or release_host_memory false ("kept": freed heap
    pages kept resident). `device` as run.device."""
    from exaforce.comm.groups import build_groups
    from exaforce.config import DTYPES, Config, DataConfig, model_preset
    from exaforce.device import choose_device, keep_freed_host_memory, to_device
    from exaforce.graph import build_batch
    from exaforce.io.schema import Frames
    from exaforce.model.potential import Potential
    from exaforce.parallel.parallelize import parallelize
    from exaforce.parallel.topology import Topology
    from exaforce.perf.flops import count_flops
    from exaforce.training.ema import weight_average
    from exaforce.training.schedule import make_optimizer
    from exaforce.training.step import step_plan, train_step

    atoms = workload_structures(workload, batch, BENCH_SEED)
    steps = warmup + repeats + 1  # the timed steps, then the FLOP count's: the schedule spans them all
    cfg = Config(run=RunConfig(steps=steps, dtype=dtype, recompute_lines=recompute_lines,
                               recompute_bonds=recompute_bonds, release_host_memory=release_host_memory),
                 model=model_preset(preset),
                 data=DataConfig(train=("bench",), global_batch_size=batch))
    on = choose_device(device)
    if on.type == "cpu" and cfg.run.keep_host_heap:  # as the trainer does
        keep_freed_host_memory()
    torch.manual_seed(BENCH_SEED)
    model = Potential(cfg.model).to(device=on, dtype=DTYPES[dtype])
    topo = Topology.single_process()
    parallel = parallelize(model, topo, build_groups(cfg.comm.backend, topo, on), cfg)
    optimizer, schedule = make_optimizer(model, cfg)  # after parallelize, as the trainer does
    average = weight_average(optimizer, cfg.optim.ema_decay)
    frames = Frames.from_atoms(atoms)
    t0 = time.perf_counter()
    graph = to_device(build_batch(frames, model.species_table(), cfg.model.cutoff, cfg.model.three_body_cutoff),
                      on, DTYPES[dtype])
    graph_build_s = time.perf_counter() - t0
    taken = 0

    def step() -> None:
        nonlocal taken
        taken += 1
        train_step(model, [graph], optimizer, parallel, cfg, 1.0 / batch, schedule.lr_at(taken), average)  # 1 / global batch

    path = "plain" if step_plan(model, graph, cfg) is None else "fused"  # run.store_all_below may choose plain
    measured = _measure(step, warmup, repeats, on)
    flops = count_flops(step)  # after the peak was read: its own extra step
    return {"model": name, "preset": preset, "recompute_lines": recompute_lines, "recompute_bonds": recompute_bonds,
            "path": path,
            "params": sum(p.numel() for p in model.parameters()),
            "width": cfg.model.width, "blocks": cfg.model.blocks, "cutoff": cfg.model.cutoff,
            "three_body_cutoff": cfg.model.three_body_cutoff, **measured, "flops": flops,
            "graph_build_s_per_structure": graph_build_s / batch, **graph.counts()}


def matris_worker(preset: str, workload: str, batch: int, dtype: str, warmup: int, repeats: int) -> dict:
    """The MatRIS reference's training step at the preset's width, depth and cutoffs, measured alike."""
    from exaforce.bench.reference import (build_matris, make_matris_step, matris_graphs, matris_param_count,
                                          matris_structures)
    from exaforce.config import DTYPES, model_preset

    cfg = model_preset(preset)
    atoms = workload_structures(workload, batch, BENCH_SEED)
    model = build_matris(cfg.width, cfg.blocks, cfg.cutoff, cfg.three_body_cutoff, DTYPES[dtype], seed=BENCH_SEED)
    structures = matris_structures(atoms)
    t0 = time.perf_counter()
    graphs = matris_graphs(model, structures, atoms, DTYPES[dtype])
    graph_build_s = time.perf_counter() - t0
    step = make_matris_step(model, atoms, energies=[a.get_potential_energy() for a in atoms],
                            forces=[a.get_forces() for a in atoms], stresses=[a.get_stress() for a in atoms],
                            graphs=graphs)
    return {"model": "matris", "params": matris_param_count(model), "width": cfg.width, "blocks": cfg.blocks,
            "cutoff": cfg.cutoff, "three_body_cutoff": cfg.three_body_cutoff, **_measure(step, warmup, repeats),
            "graph_build_s_per_structure": graph_build_s / batch, "structures": batch,
            "atoms": sum(len(a) for a in atoms)}


def mace_worker(preset: str, workload: str, batch: int, dtype: str, warmup: int, repeats: int) -> dict:
    """MACE-MP-0-medium-like (exaforce.bench.reference_mace) on the same batch, measured alike; its
    architecture is MACE's own (the preset is not used)."""
    from exaforce.bench.reference_mace import R_MAX, build_mace, mace_graphs, mace_param_count, make_mace_step
    from exaforce.config import DTYPES

    atoms = workload_structures(workload, batch, BENCH_SEED)
    model = build_mace(DTYPES[dtype], seed=BENCH_SEED)
    t0 = time.perf_counter()
    graphs = mace_graphs(model, atoms, DTYPES[dtype])
    graph_build_s = time.perf_counter() - t0
    step = make_mace_step(model, atoms, energies=[a.get_potential_energy() for a in atoms],
                          forces=[a.get_forces() for a in atoms], stresses=[a.get_stress() for a in atoms],
                          graphs=graphs)
    return {"model": "mace", "params": mace_param_count(model), "cutoff": R_MAX, **_measure(step, warmup, repeats),
            "graph_build_s_per_structure": graph_build_s / batch, "structures": batch,
            "edges": int(graphs["edge_index"].shape[1]), "atoms": sum(len(a) for a in atoms)}


WORKERS = {"exaforce": exaforce_worker, "store": partial(exaforce_worker, recompute_lines=0, name="store"),
           "sums": partial(exaforce_worker, recompute_bonds=False, name="sums"),
           "kept": partial(exaforce_worker, release_host_memory=False, name="kept"),
           "matris": matris_worker, "mace": mace_worker}
# --compare: the stored path, the sums-stored one, the step without heap trimming, the references
COMPARABLE = ("store", "sums", "kept", "matris", "mace")
ON_DEVICE = ("exaforce", "store", "sums", "kept")  # the workers that take a device; the references run on the CPU here


def run_worker(model: str, preset: str, workload: str, batch: int, dtype: str, warmup: int, repeats: int,
               mem_limit_gib: float, device: str = "cpu") -> dict:
    """One (model, batch) measurement in a fresh Python process capped at `mem_limit_gib` of address
    space; its last stdout line is JSON. A worker that ran out of memory comes back as
    {"oom": True, ...}; any other failure raises RuntimeError with the end of its stderr."""
    cap = int(mem_limit_gib * 2**30)

    def limit_address_space() -> None:  # runs in the child, between fork and exec
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    command = module_command("exaforce.bench.step", model, preset, workload, str(batch), dtype, str(warmup),
                             str(repeats), device)
    # Not launcher.launch: that one cannot set a limit in the child.
    # A GPU runtime reserves far more address space than it uses: the cap is for the CPU's memory only.
    proc = subprocess.run(command, capture_output=True, text=True, env=environment(),
                          preexec_fn=limit_address_space if device == "cpu" else None)
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    if proc.returncode == -9 or OOM_PATTERN.search(proc.stderr):
        return {"model": model, "structures": batch, "oom": True, "mem_limit_gib": mem_limit_gib,
                "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    raise RuntimeError(f"bench worker for {model}, batch {batch} failed (exit {proc.returncode}):\n"
                       f"{proc.stderr[-STDERR_TAIL:]}")


def memory_fit(rows: list[dict], key: str) -> tuple[float, float] | None:
    """Least-squares slope (bytes per atom) and intercept (bytes) of `key` against atoms; None below 2
    distinct atom counts."""
    ran = [r for r in rows if not r.get("oom")]
    if len({r["atoms"] for r in ran}) < 2:
        return None
    slope, intercept = np.polyfit([r["atoms"] for r in ran], [r[key] for r in ran], 1)
    return float(slope), float(intercept)


MEDIAN_KEYS = ("step_s", "start_rss_bytes", "baseline_rss_bytes", "peak_rss_bytes", "peak_mem_bytes", "step_mem_bytes",
               "graph_build_s_per_structure")


def _median_row(runs: list[dict]) -> dict:
    """One batch's row over repeated runs: medians of time and memory, every run's step time and peak kept."""
    if any(r.get("oom") for r in runs):
        return next(r for r in runs if r.get("oom"))
    row = {**runs[0], **{k: statistics.median(r[k] for r in runs) for k in MEDIAN_KEYS}}
    row["runs"] = [{"step_s": r["step_s"], "peak_rss_bytes": r["peak_rss_bytes"]} for r in runs]
    return row


def _sweep(model: str, preset: str, workload: str, batches: list[int], dtype: str, warmup: int, repeats: int,
           runs: int, mem_limit_gib: float, log: Callable[[str], None], device: str = "cpu") -> dict:
    """`runs` workers per batch size for `model`; per-batch median rows, the memory fits, the largest batch that ran."""
    rows = []
    for batch in batches:
        measured = []
        for run in range(runs):
            log(f"  {model}: batch {batch}, run {run + 1}/{runs} starting (worker process, cap {mem_limit_gib:g} GiB) …")
            t0 = time.perf_counter()
            record = run_worker(model, preset, workload, batch, dtype, warmup, repeats, mem_limit_gib, device)
            measured.append(record)
            if record.get("oom"):
                log(f"  {model}: batch {batch} out of memory (cap {mem_limit_gib:g} GiB): {record['error']}")
                break
            log(f"  {model}: batch {batch} done in {time.perf_counter() - t0:.0f} s: {record['atoms']} atoms, "
                f"{record['step_s'] * 1e3:.1f} ms/step, peak {record['peak_rss_bytes'] / 2**20:.1f} MiB")
        row = _median_row(measured)
        if not row.get("oom"):
            row["atoms_per_s"] = row["atoms"] / row["step_s"]
            if "flops" in row:  # exaforce's workers count FLOPs (executed, recomputation included)
                row["flops_per_s"] = row["flops"] / row["step_s"]
        rows.append(row)
    ran = [r for r in rows if not r.get("oom")]
    peak_fit, step_fit = memory_fit(rows, "peak_rss_bytes"), memory_fit(rows, "step_mem_bytes")
    return {"model": model, "batches": rows, "largest_batch_ran": max((r["structures"] for r in ran), default=None),
            "peak_mem_slope_bytes_per_atom": peak_fit and peak_fit[0],
            "peak_mem_intercept_bytes": peak_fit and peak_fit[1],
            "step_mem_slope_bytes_per_atom": step_fit and step_fit[0],
            "step_mem_intercept_bytes": step_fit and step_fit[1]}


def _row_line(r: dict, mem_limit_gib: float) -> str:
    if r.get("oom"):
        return f"{r['structures']:>6}  out of memory (cap {mem_limit_gib:g} GiB)"
    edges = f"{r['edges']:>9,} " if "edges" in r else f"{'-':>9} "
    edges += f"{r['angles']:>10,}" if "angles" in r else f"{'-':>10}"
    return (f"{r['structures']:>6} {r['atoms']:>6} {edges} {r['step_s'] * 1e3:>10.1f} {r['atoms_per_s']:>9.1f} "
            f"{r['graph_build_s_per_structure'] * 1e3:>9.2f} {r['peak_rss_bytes'] / 2**20:>9.1f} "
            f"{r['baseline_rss_bytes'] / 2**20:>9.1f} {r['step_mem_bytes'] / 2**20:>9.1f}")


def _log_sweep(name: str, sweep: dict, mem_limit_gib: float, log: Callable[[str], None]) -> None:
    log(f"{name}, per batch size (ms/graph: graph build per structure, outside the step):")
    log(f"{'batch':>6} {'atoms':>6} {'edges':>9} {'angles':>10} {'ms/step':>10} {'atoms/s':>9} {'ms/graph':>9} "
        f"{'peak MiB':>9} {'base MiB':>9} {'step MiB':>9}")
    for r in sweep["batches"]:
        log(_row_line(r, mem_limit_gib))
    slope = sweep["peak_mem_slope_bytes_per_atom"]
    if slope is not None:
        log(f"{name}: peak memory ≈ {sweep['peak_mem_intercept_bytes'] / 2**20:.1f} MiB "
            f"+ {slope / 2**20:.3f} MiB/atom "
            f"(step memory {sweep['step_mem_slope_bytes_per_atom'] / 2**20:.3f} MiB/atom; least squares)")
    log(f"{name}: largest batch that ran: {sweep['largest_batch_ran']}")


def _largest(sweep: dict) -> dict | None:
    ran = [r for r in sweep["batches"] if not r.get("oom")]
    return max(ran, key=lambda r: r["structures"]) if ran else None


def _summary(sweep: dict) -> dict:
    """The top-level fields of a sweep: its largest batch that ran."""
    top = _largest(sweep)
    if top is None:
        return {}
    return {"params": top["params"], "batch": top["structures"], "atoms": top["atoms"], "step_s": top["step_s"],
            "atoms_per_s": top["atoms_per_s"], "structures_per_s": top["structures"] / top["step_s"],
            "peak_mem_bytes": top["peak_mem_bytes"], "peak_rss_bytes": top["peak_rss_bytes"],
            "baseline_rss_bytes": top["baseline_rss_bytes"], "step_mem_bytes": top["step_mem_bytes"],
            "graph_build_s_per_structure": top["graph_build_s_per_structure"]}


def bench_step(preset: str, workload: str, batches: list[int], dtype: str, warmup: int, repeats: int,
               compare: list[str], mem_limit_gib: float, log: Callable[[str], None], runs: int = 1,
               device: str = "cpu") -> dict:
    """The sweep over `batches` for exaforce (and each of `compare`: "store", "sums", "kept", "matris", "mace"); the
    top-level keys describe exaforce's largest batch that ran, `batches` every one of them, and
    `references` the compared sweeps alike."""
    from exaforce.device import choose_device
    from exaforce.perf.machines import device_machine

    if choose_device(device).type != "cpu" and set(compare) - set(ON_DEVICE):
        raise ValueError(f"--compare {','.join(sorted(set(compare) - set(ON_DEVICE)))}: the references run on the "
                         f"CPU only; with --device {device} compare store or sums")

    log(f"bench step: preset {preset}, workload {workload} (seed {BENCH_SEED}), batches {batches}, {dtype}, "
        f"{warmup} warm-up + {repeats} timed steps, {runs} run(s) per batch (medians), "
        f"{torch.get_num_threads()} thread(s), memory cap {mem_limit_gib:g} GiB per worker, exaforce on {device}")
    device = choose_device(device).type  # "auto" resolved once: the worker's memory cap depends on it
    ours = _sweep("exaforce", preset, workload, batches, dtype, warmup, repeats, runs, mem_limit_gib, log, device)
    peak_flops = device_machine(choose_device(device), getattr(torch, dtype))["peak_flops_per_s"]
    result = {"preset": preset, "workload": workload, "dtype": dtype, "mem_limit_gib": mem_limit_gib, "runs": runs,
              "recompute_lines": RunConfig().recompute_lines, "recompute_bonds": RunConfig().recompute_bonds,
              "peak_flops_per_s": peak_flops, **ours,
              **_summary(ours), "references": {}}
    _log_sweep("exaforce", ours, mem_limit_gib, log)
    top = _largest(ours)
    if top is not None:
        result.update({
            "edges": top["edges"], "angles": top["angles"], "flops_per_step": top["flops"],
            "flops_per_atom": top["flops"] / top["atoms"], "flops_per_edge": top["flops"] / max(top["edges"], 1),
            "flops_per_angle": top["flops"] / max(top["angles"], 1), "flops_per_s": top["flops_per_s"]})
        log(f"exaforce  {top['params']:>12,} params, batch {top['structures']} ({top.get('path', '?')} path): "
            f"{top['step_s'] * 1e3:.1f} ms/step, "
            f"{result['atoms_per_s']:.1f} atoms/s, {result['structures_per_s']:.2f} structures/s, "
            f"{top['flops'] / 1e9:.2f} GFLOP/step executed (recomputation included) = "
            f"{result['flops_per_atom'] / 1e6:.2f} MFLOP/atom, {result['flops_per_edge'] / 1e6:.3f} MFLOP/edge, "
            f"{result['flops_per_angle'] / 1e6:.3f} MFLOP/angle; {result['flops_per_s'] / 1e9:.2f} GFLOP/s = "
            f"{100 * result['flops_per_s'] / peak_flops:.1f}% of the local matmul peak {peak_flops / 1e9:.1f} GFLOP/s")
    else:
        log(f"exaforce: no batch ran within the {mem_limit_gib:g} GiB cap")
    for name in compare:
        ref = _sweep(name, preset, workload, batches, dtype, warmup, repeats, runs, mem_limit_gib, log, device)
        result["references"][name] = {**ref, **_summary(ref)}
        _log_sweep(name, ref, mem_limit_gib, log)
        ref_top = _largest(ref)
        if ref_top is not None and name == "store":
            log(f"store: {ref_top['flops'] / 1e9:.2f} GFLOP/step at batch {ref_top['structures']} (the step's "
                f"arithmetic without recomputation), {ref_top['flops_per_s'] / 1e9:.2f} GFLOP/s = "
                f"{100 * ref_top['flops_per_s'] / peak_flops:.1f}% of the local matmul peak")
        if top is not None and ref_top is not None:
            log(f"exaforce at batch {top['structures']} vs {name} at its largest batch {ref_top['structures']}: "
                f"atoms/s ratio {top['atoms_per_s'] / ref_top['atoms_per_s']:.2f}")
        mine_by_batch = {r["structures"]: r for r in ours["batches"] if not r.get("oom")}
        for r in ref["batches"]:
            mine = mine_by_batch.get(r["structures"])
            if mine and not r.get("oom"):
                log(f"batch {r['structures']}: exaforce/{name}: atoms/s {mine['atoms_per_s'] / r['atoms_per_s']:.2f}x, "
                    f"peak memory {mine['peak_rss_bytes'] / r['peak_rss_bytes']:.3f}, "
                    f"step memory {mine['step_mem_bytes'] / max(r['step_mem_bytes'], 1):.3f}")
    return result


if __name__ == "__main__":  # worker entry: model preset workload batch dtype warmup repeats device
    name, preset_name, workload_name, n, dt, w, r, on = sys.argv[1:9]
    extra = {"device": on} if name in ON_DEVICE else {}
    print(json.dumps(WORKERS[name](preset_name, workload_name, int(n), dt, int(w), int(r), **extra)))
