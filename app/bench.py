"""`exaforce bench step`: the full training step's speed, memory and FLOP/s, optionally beside MatRIS.

Each model is measured in its own subprocess, so one model's peak memory never hides the
other's. Peak memory is the growth of the process's peak RSS over its RSS just before the first
step: the step's own working set (activations, double-backward graph, optimizer state), the
CPU analogue of torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import numpy as np
import torch

BENCH_SEED = 0


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


def exaforce_worker(preset: str, batch: int, dtype: torch.dtype, warmup: int, repeats: int) -> dict:
    from exaforce.config import Config, DataConfig, model_preset
    from exaforce.io.schema import Frames
    from exaforce.model.graph import build_batch
    from exaforce.model.potential import Potential
    from exaforce.perf.flops import count_flops
    from exaforce.train import loss_and_gradients

    atoms = bench_structures(batch)
    cfg = Config(model=model_preset(preset), data=DataConfig(train=("bench",), global_batch_size=batch))
    torch.manual_seed(BENCH_SEED)
    model = Potential(cfg.model).to(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    graph = build_batch(Frames.from_atoms(atoms), model.species_table(), cfg.model.cutoff,
                        cfg.model.three_body_cutoff).to("cpu", dtype)
    counts = graph.counts()

    def step() -> None:  # train_step without the gradient reduction (one process)
        optimizer.zero_grad(set_to_none=True)
        loss_and_gradients(model, graph, cfg, 1.0 / batch, {})
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()

    flops = count_flops(step)
    seconds, peak = _time_steps(step, warmup, repeats)
    return {"model": "exaforce", "preset": preset, "params": sum(p.numel() for p in model.parameters()),
            "width": cfg.model.width, "blocks": cfg.model.blocks, "cutoff": cfg.model.cutoff,
            "three_body_cutoff": cfg.model.three_body_cutoff, "step_s": seconds, "flops": flops,
            "peak_mem_bytes": peak, **counts}


def matris_worker(preset: str, batch: int, dtype: torch.dtype, warmup: int, repeats: int) -> dict:
    from exaforce.config import model_preset
    from exaforce.reference_matris import build_matris, make_matris_step, matris_param_count

    cfg = model_preset(preset)
    atoms = bench_structures(batch)
    model = build_matris(cfg.width, cfg.blocks, cfg.cutoff, cfg.three_body_cutoff, dtype, seed=BENCH_SEED)
    step = make_matris_step(model, atoms,
                            energies=[a.get_potential_energy() for a in atoms],
                            forces=[a.get_forces() for a in atoms],
                            stresses=[a.get_stress() for a in atoms])
    seconds, peak = _time_steps(step, warmup, repeats)
    return {"model": "matris", "params": matris_param_count(model), "width": cfg.width, "blocks": cfg.blocks,
            "cutoff": cfg.cutoff, "three_body_cutoff": cfg.three_body_cutoff, "step_s": seconds,
            "peak_mem_bytes": peak, "structures": batch, "atoms": sum(len(a) for a in atoms)}


WORKERS = {"exaforce": exaforce_worker, "matris": matris_worker}

# glibc malloc settings for both workers alike: keep freed memory in the heap instead of returning
# it to the kernel, because fresh pages are slow to come by on these VMs (measured on the base
# preset, 2 cores: 1.78 s → 1.70 s per step). A value already in the environment wins.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**36),
              "MALLOC_TOP_PAD_": str(2**28)}


def run_worker(model: str, preset: str, batch: int, dtype: str, warmup: int, repeats: int) -> dict:
    """One model's measurement in a fresh Python process; its last stdout line is JSON."""
    cmd = [sys.executable, "-m", "exaforce.bench", model, preset, str(batch), dtype, str(warmup), str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**MALLOC_ENV, **os.environ})
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker for {model} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
    print(json.dumps(WORKERS[name](preset_name, int(n), getattr(torch, dt), int(w), int(r))))


def bench_md(checkpoint_path: str, steps: int, temperature_k: float, dtype: str,
             log: Callable[[str], None]) -> dict:
    """NVE velocity-Verlet on a 108-atom fcc Cu cell (3×3×3 conventional), 1 fs steps, through the
    ASE calculator; reports the total-energy drift per atom (a check of smoothness and of forces
    being the exact gradient of the energy)."""
    from ase import units
    from ase.build import bulk
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.md.verlet import VelocityVerlet

    from exaforce.calculator import ExaforceCalculator

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 3, 3))
    atoms.calc = ExaforceCalculator.from_checkpoint(checkpoint_path, dtype=dtype)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_k, rng=np.random.default_rng(BENCH_SEED))
    Stationary(atoms)
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    n = len(atoms)
    totals, t0 = [], time.perf_counter()

    def record() -> None:
        totals.append(atoms.get_potential_energy() + atoms.get_kinetic_energy())
        if len(totals) % max(steps // 10, 1) == 1 or len(totals) == steps + 1:
            log(f"  step {len(totals) - 1:>6}/{steps}  E_tot {totals[-1]:.6f} eV  "
                f"T {atoms.get_temperature():6.1f} K  {time.perf_counter() - t0:6.1f} s")

    dyn.attach(record, interval=1)
    record()
    dyn.run(steps)
    totals_arr = np.array(totals[1:]) if len(totals) > steps + 1 else np.array(totals)
    deviation = np.abs(totals_arr - totals_arr[0]) / n
    slope = np.polyfit(np.arange(len(totals_arr)) * 1e-3, totals_arr / n, 1)[0]  # eV/atom per ps
    result = {"atoms": n, "steps": steps, "timestep_fs": 1.0, "temperature_k": temperature_k,
              "max_abs_drift_mev_per_atom": 1e3 * float(deviation.max()),
              "final_drift_mev_per_atom": 1e3 * float((totals_arr[-1] - totals_arr[0]) / n),
              "linear_drift_mev_per_atom_per_ps": 1e3 * float(slope),
              "seconds": time.perf_counter() - t0}
    log(f"NVE {n} atoms, {steps} × 1 fs: max |E_tot(t) − E_tot(0)| = {result['max_abs_drift_mev_per_atom']:.4f} "
        f"meV/atom, final {result['final_drift_mev_per_atom']:+.4f} meV/atom, "
        f"linear fit {result['linear_drift_mev_per_atom_per_ps']:+.4f} meV/atom/ps, {result['seconds']:.0f} s")
    return result
