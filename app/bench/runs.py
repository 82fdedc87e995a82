"""Benchmarks made of real training runs: `mpiexec -n R exaforce train` on EMT data from `data synth`,
read back from the perf logs (step time = the slowest rank's, median over the timed steps).

`bench ep`: data parallel only (dp = R, ep = 1) against expert parallel (dp = R/ep, ep) at the same
per-rank batch; shares of the step in the all-to-all and in gradient reduction; peak memory.
`bench ep --skew`: static against dynamic expert placement (with replicas) on a skewed composition.
`bench balance`: the demo's multi-fidelity data (EMT metals, GFN2/GFN1 molecules) with the
cost-balanced deal and with round-robin: max/mean over ranks of predicted cost and of measured
compute time (forward + both backwards) per step.
`bench comm`: each backend's gradient-reduction time per step, with the reduction launched from
the backward (overlap) and after it; the share hidden = 1 − exposed(overlap) / reduction(no overlap).
A world barrier before the reduction (comm.sync_before_reduce) keeps the slowest rank's lateness
out of both figures; it is reported apart as load imbalance.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from exaforce.bench import BENCH_SEED
from exaforce.bench.config_file import write_config
from exaforce.bench.launcher import environment, exaforce_command, launch, on_ranks

if TYPE_CHECKING:
    from exaforce.config import Config
    from exaforce.perf.runlog import Run

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.toml"


def _timed_steps(run: Run, warmup: int) -> dict[int, list[dict]]:
    """Every rank's record of each step after `warmup`, by step."""
    by_step: dict[int, list[dict]] = {}
    for records in run.steps.values():
        for record in records:
            if record["step"] > warmup:
                by_step.setdefault(record["step"], []).append(record)
    if not by_step:
        raise RuntimeError(f"{run.run_dir}: no step after the {warmup} warm-up step(s); run more steps")
    return by_step


def summarize_run(run_dir: Path, warmup: int) -> dict:
    """Median step time over the steps after `warmup` (slowest rank per step) and shares of it."""
    from exaforce.perf.runlog import load_run

    run = load_run(run_dir)
    by_step = _timed_steps(run, warmup)
    step_times = [max(r["total_time"] for r in records) for records in by_step.values()]

    def share(key: str) -> float:
        """Mean over steps and ranks of time[key] / that step's slowest-rank time."""
        return statistics.fmean(r["times"].get(key, 0.0) / max(rr["total_time"] for rr in records)
                                for records in by_step.values() for r in records)

    peaks = {rank: max(r["peak_mem_bytes"] for r in records) for rank, records in run.steps.items()}
    every_step: dict[int, list[dict]] = {}
    for records in run.steps.values():
        for record in records:
            every_step.setdefault(record["step"], []).append(record)
    losses = [sum(r["loss_sum"]["total"] for r in rs) / sum(r["structures"] for r in rs)
              for _, rs in sorted(every_step.items())]  # global mean loss of each step
    comm = [statistics.fmean(r["times"]["comm"] for r in records) for records in by_step.values()]
    imbalance = [statistics.fmean(r["times"].get("imbalance", 0.0) for r in records) for records in by_step.values()]
    return {"step_s": statistics.median(step_times), "steps_timed": len(step_times), "losses": losses,
            "comm_s": statistics.median(comm), "imbalance_s": statistics.median(imbalance),
            "alltoall_share": share("alltoall"), "grad_reduction_share": share("comm"),
            "routing_share": share("routing"),
            "peak_mem_gib_per_rank": [round(peaks[r] / 2**30, 2) for r in sorted(peaks)]}


class TrainingRuns:
    """A temporary folder of synthesised datasets and the runs made on them, each in TMP/<name>."""

    def __init__(self, tmp: Path, ranks: int, log: Callable[[str], None]):
        self.tmp, self.ranks, self.log = tmp, ranks, log
        self.env = environment(OMP_NUM_THREADS="1")

    def dataset(self, name: str, structures: int, *synth_options: str) -> Path:
        """`exaforce data synth` (seed BENCH_SEED), then `data convert` to TMP/<name>.bp, named `name`."""
        extxyz, bp = self.tmp / f"{name}.extxyz", self.tmp / f"{name}.bp"
        launch(exaforce_command("data", "synth", "--out", str(extxyz), "--structures", str(structures),
                                "--seed", str(BENCH_SEED), *synth_options), f"bench: data synth of {name}", self.env)
        launch(exaforce_command("data", "convert", str(extxyz), "--out", str(bp), "--name", name),
               f"bench: data convert of {name}", self.env)
        return bp

    def train(self, name: str, cfg: Config) -> Path:
        """`mpiexec -n R exaforce train` of `cfg` with its run folder TMP/<name>; returns the folder."""
        run_dir, path = self.tmp / name, self.tmp / f"{name}.toml"
        write_config(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=str(run_dir))), path)
        launch(on_ranks(self.ranks, exaforce_command("train", "--config", str(path))), f"bench: the {name} run",
               self.env)
        return run_dir

    def timed(self, name: str, warmup: int, cfg: Config) -> dict:
        """train(), then summarize_run() of its perf logs."""
        self.log(f"bench: {name}: mpiexec -n {self.ranks} exaforce train ({cfg.run.steps} steps)")
        return summarize_run(self.train(name, cfg), warmup)


def synthetic_run_config(data: Path, preset: str, experts: int | None, batch: int, steps: int, dp: int, ep: int,
                         dtype: str, backend: str = "mpi", overlap: bool = True, sync: bool = False,
                         recompute_lines: int | None = None) -> Config:
    """A run on one synthesised dataset, every step logged, no checkpoint at the end; run.recompute_lines
    as given (None: its default)."""
    from exaforce.config import from_dict

    recompute = {} if recompute_lines is None else {"recompute_lines": recompute_lines}
    return from_dict({
        "run": {"steps": steps, "log_every": 1, "dtype": dtype, "final_checkpoint": False, "seed": BENCH_SEED,
                **recompute},
        "data": {"train": [str(data)], "global_batch_size": batch},
        "model": {"preset": preset, **({"moe_experts": experts} if experts else {})},
        "loss": {"stress_weight": 0.1},
        "parallel": {"dp": dp, "ep": ep},
        "comm": {"backend": backend, "overlap": overlap, "sync_before_reduce": sync},
    })


def bench_ep(preset: str, ranks: int, ep: int, experts: int | None, batch_per_rank: int, steps: int,
             warmup: int, dtype: str, baseline: bool, log: Callable[[str], None],
             recompute_lines: int | None = None) -> dict:
    from exaforce.config import ConfigError, model_preset

    cfg = model_preset(preset)
    n_experts = experts or cfg.moe_experts
    if not n_experts or n_experts % ep or ranks % ep:
        raise ConfigError(f"bench ep: need an MoE preset with experts divisible by ep = {ep} and ranks ({ranks}) "
                          f"divisible by ep; {preset} has {n_experts} experts")
    results = {"preset": preset, "experts": n_experts, "ranks": ranks, "batch_per_rank": batch_per_rank,
               "steps": steps, "warmup": warmup, "dtype": dtype, "recompute_lines": recompute_lines}
    with tempfile.TemporaryDirectory(prefix="exaforce-bench-ep-") as tmp:
        runs = TrainingRuns(Path(tmp), ranks, log)
        data = runs.dataset("bench", max(64, 4 * ranks * batch_per_rank))
        layouts = ([("dp_only", ranks, 1)] if baseline else []) + [("expert_parallel", ranks // ep, ep)]
        for name, dp, ep_size in layouts:
            run_cfg = synthetic_run_config(data, preset, experts, batch_per_rank * ranks, steps, dp, ep_size, dtype,
                                           recompute_lines=recompute_lines)
            r = results[name] = {"dp": dp, "ep": ep_size, **runs.timed(name, warmup, run_cfg)}
            log(f"  losses {', '.join(f'{x:.4g}' for x in r['losses'])}")
            log(f"  step {r['step_s'] * 1e3:.0f} ms (median of {r['steps_timed']}), all-to-all "
                f"{100 * r['alltoall_share']:.1f}%, gradient reduction {100 * r['grad_reduction_share']:.1f}%, "
                f"routing exchange {100 * r['routing_share']:.1f}%, peak memory/rank {r['peak_mem_gib_per_rank']} GiB")
    if baseline:
        results["ep_over_dp_step_time"] = results["expert_parallel"]["step_s"] / results["dp_only"]["step_s"]
        log(f"bench ep: ep={ep} step time / ep=1 step time = {results['ep_over_dp_step_time']:.3f}")
    return results


def skewed_run_config(metals: Path, molecules: Path, preset: str, experts: int | None, batch: int, steps: int,
                      ep: int, every: int, replicas: int, resident: int, dtype: str) -> Config:
    """`bench ep --skew`: two fidelities (EMT metals with 80 % of atoms Cu or Au, GFN2 molecules) on
    two heads, expert parallel over every rank; `every` > 0: dynamic placement with `replicas` spare
    slots; `resident` > 0: experts offloaded with that many resident per layer."""
    from exaforce.config import from_dict

    return from_dict({
        "run": {"steps": steps, "log_every": 1, "dtype": dtype, "final_checkpoint": False, "seed": BENCH_SEED},
        "data": {"global_batch_size": batch, "balance": False,
                 "datasets": [{"path": str(metals), "head": "emt"}, {"path": str(molecules), "head": "gfn2"}]},
        "model": {"preset": preset, **({"moe_experts": experts} if experts else {}), "heads": ["emt", "gfn2"],
                  "elements": ["Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt", "H", "C", "N", "O", "F", "S", "Cl", "Si",
                               "P", "B"]},
        "loss": {"stress_weight": 0.1},
        "parallel": {"dp": 1, "ep": ep, "replace_experts_every": every, "expert_replicas": replicas if every else 0,
                     "resident_experts": resident},
    })


def expert_balance(run_dir: Path, after: int) -> dict:
    """From a run's perf logs, over the steps after `after`: max / mean over EP ranks of the rows their
    experts ran — per step, all MoE layers together (median) and the worst layer (median and max over
    steps), and summed over those steps (worst layer) — and the all-to-all bytes all ranks sent per
    step (median)."""
    from exaforce.perf.runlog import load_run

    run = load_run(run_dir)
    first = run.steps[min(run.steps)]
    records = [r for r in first if r["step"] > after]
    if not records:
        raise RuntimeError(f"{run_dir}: no step after step {after}; run more steps")

    def ratio(rows: list[float]) -> float:
        return max(rows) / max(statistics.fmean(rows), 1e-30)

    per_step = [max(ratio(rows) for rows in r["expert_load"]["ep_rank_rows"]) for r in records]
    all_layers = [ratio(np.sum(r["expert_load"]["ep_rank_rows"], axis=0).tolist()) for r in records]
    layers = len(records[0]["expert_load"]["ep_rank_rows"])
    summed = [[sum(r["expert_load"]["ep_rank_rows"][i][p] for r in records)
               for p in range(len(records[0]["expert_load"]["ep_rank_rows"][i]))] for i in range(layers)]
    steps = sorted({r["step"] for r in records})
    every_rank = [r for rank in run.steps.values() for r in rank if r["step"] > after]
    sent = [sum(sum(r["expert_load"]["alltoall_bytes"]) for r in every_rank if r["step"] == s) for s in steps]
    result = {"max_over_mean_all_layers_per_step_median": statistics.median(all_layers),
              "max_over_mean_per_step_median": statistics.median(per_step), "max_over_mean_per_step_max": max(per_step),
              "max_over_mean_summed": max(ratio(rows) for rows in summed),
              "alltoall_mib_per_step": statistics.median(sent) / 2**20}
    if "offload_fetched_bytes" in records[0]:  # per rank: bytes into its device buffers, the fullest layer's peak
        fetched = statistics.median(r["offload_fetched_bytes"] for r in every_rank)
        result.update(offload_fetched_mib_per_rank_step=fetched / 2**20,
                      offload_peak_resident_mib=max(r["offload_peak_resident_bytes"] for r in every_rank) / 2**20,
                      offload_peak_resident_experts=max(r["offload_peak_resident_experts"] for r in every_rank))
    return result


def bench_ep_skew(preset: str, ranks: int, experts: int | None, batch_per_rank: int, steps: int, warmup: int,
                  every: int, replicas: int, resident: int, dtype: str, log: Callable[[str], None]) -> dict:
    """Static against dynamic expert placement (ep = ranks) on a skewed, two-fidelity composition: the
    balance of expert work over the EP ranks, step time and all-to-all bytes, each run in its own
    `mpiexec`; with `resident` > 0 also the dynamic run with experts offloaded (bytes fetched, peak
    resident). All are measured over the same steps: those after the warm-up and after the first
    re-placement."""
    results: dict = {"preset": preset, "experts": experts, "ranks": ranks, "batch_per_rank": batch_per_rank,
                     "steps": steps, "warmup": warmup, "replace_experts_every": every, "expert_replicas": replicas,
                     "dtype": dtype, "composition": "80 % of metal atoms Cu or Au; GFN2 molecules on a second head"}
    after = max(warmup, every)
    with tempfile.TemporaryDirectory(prefix="exaforce-bench-ep-skew-") as tmp:
        runs = TrainingRuns(Path(tmp), ranks, log)
        metals = runs.dataset("skewed", max(64, 4 * ranks * batch_per_rank), "--source", "skewed-metals")
        molecules = runs.dataset("gfn2", max(64, 4 * ranks * batch_per_rank), "--source", "molecules")
        variants = [("static", 0, 0), ("dynamic", every, 0)] + ([("dynamic_offload", every, resident)] if resident else [])
        for name, run_every, run_resident in variants:
            cfg = skewed_run_config(metals, molecules, preset, experts, batch_per_rank * ranks, steps, ranks,
                                    run_every, replicas, run_resident, dtype)
            r = results[name] = {**runs.timed(name, after, cfg), **expert_balance(runs.tmp / name, after)}
            r.pop("losses")
            log(f"  {name}: expert rows max / mean over EP ranks per step {r['max_over_mean_all_layers_per_step_median']:.3f} "
                f"(all layers, median), worst layer {r['max_over_mean_per_step_median']:.3f} (median; worst step "
                f"{r['max_over_mean_per_step_max']:.3f}), {r['max_over_mean_summed']:.3f} summed over the steps; step {r['step_s'] * 1e3:.0f} ms (median of {r['steps_timed']}), all-to-all "
                f"{r['alltoall_mib_per_step']:.2f} MiB/step ({100 * r['alltoall_share']:.1f}% of the step), "
                f"peak memory/rank {r['peak_mem_gib_per_rank']} GiB")
            if run_resident:
                log(f"  {name}: {run_resident} resident expert(s) per layer: {r['offload_fetched_mib_per_rank_step']:.2f} "
                    f"MiB fetched per rank and step (median), peak resident {r['offload_peak_resident_mib']:.3f} MiB = "
                    f"{r['offload_peak_resident_experts']:.2f} expert(s) in the fullest layer")
    results["dynamic_over_static_step_time"] = results["dynamic"]["step_s"] / results["static"]["step_s"]
    log(f"bench ep --skew: dynamic / static step time = {results['dynamic_over_static_step_time']:.3f}")
    return results


def bench_comm(preset: str, ranks: int, batch_per_rank: int, steps: int, warmup: int, dtype: str,
               backends: list[str], log: Callable[[str], None]) -> dict:
    """Per backend: exposed reduction time per step with and without overlap (median over steps)."""
    results: dict = {"preset": preset, "ranks": ranks, "batch_per_rank": batch_per_rank, "steps": steps,
                     "warmup": warmup, "dtype": dtype}
    with tempfile.TemporaryDirectory(prefix="exaforce-bench-comm-") as tmp:
        runs = TrainingRuns(Path(tmp), ranks, log)
        data = runs.dataset("bench", max(64, 4 * ranks * batch_per_rank))
        for backend in backends:
            r = results[backend] = {}
            for overlap in (False, True):
                run_cfg = synthetic_run_config(data, preset, None, batch_per_rank * ranks, steps, ranks, 1, dtype,
                                               backend=backend, overlap=overlap, sync=True)
                summary = runs.timed(f"{backend}-{'overlap' if overlap else 'after'}", warmup, run_cfg)
                r["overlap" if overlap else "after_backward"] = summary
            after, over = r["after_backward"]["comm_s"], r["overlap"]["comm_s"]
            r["hidden_share"] = max(0.0, 1.0 - over / after) if after > 0 else 0.0
            log(f"  {backend}: reduction {after * 1e3:.1f} ms/step after the backward, {over * 1e3:.1f} ms exposed "
                f"with overlap ({100 * r['hidden_share']:.0f}% hidden); step {r['after_backward']['step_s'] * 1e3:.0f}"
                f" → {r['overlap']['step_s'] * 1e3:.0f} ms; load imbalance {r['overlap']['imbalance_s'] * 1e3:.0f} ms")
    return results


def demo_run_config(datasets_dir: Path, steps: int, balance: bool) -> Config:
    """configs/demo.toml reading its datasets from `datasets_dir`, for `steps` steps, dealing by cost
    (balance) or round-robin."""
    from exaforce.config import load

    cfg = load(DEMO_CONFIG)
    datasets = tuple(dataclasses.replace(d, path=str(datasets_dir / Path(d.path).name)) for d in cfg.data.datasets)
    return dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, steps=steps),
        data=dataclasses.replace(cfg.data, datasets=datasets, balance=balance),
        parallel=dataclasses.replace(cfg.parallel, dp=0))  # the demo pins 2 ranks: take whatever --ranks gives


def bench_balance(structures: int, ranks: int, steps: int, warmup: int, log: Callable[[str], None]) -> dict:
    """configs/demo.toml on freshly synthesised demo data, balanced and round-robin deal."""
    from exaforce.perf.runlog import load_run

    results: dict = {"structures": structures, "ranks": ranks, "steps": steps, "warmup": warmup}
    with tempfile.TemporaryDirectory(prefix="exaforce-bench-balance-") as tmp:
        runs = TrainingRuns(Path(tmp), ranks, log)
        runs.dataset("emt", structures)
        runs.dataset("gfn2", structures, "--source", "molecules", "--method", "GFN2-xTB")
        runs.dataset("gfn1", structures // 2, "--source", "molecules", "--method", "GFN1-xTB")
        for balance in (True, False):
            name = "balanced" if balance else "round_robin"
            log(f"bench balance: {name}: mpiexec -n {ranks} exaforce train, {steps} steps")
            run_dir = runs.train(name, demo_run_config(runs.tmp, steps, balance))
            by_step = _timed_steps(load_run(run_dir), warmup)
            compute = [[sum(r["times"][k] for k in ("forward", "force_backward", "param_backward")) for r in rs]
                       for rs in by_step.values()]
            r = results[name] = {
                "cost_max_over_mean": statistics.median(rs[0]["cost_max_over_mean"] for rs in by_step.values()),
                "time_max_over_mean": statistics.median(max(c) / statistics.fmean(c) for c in compute),
                "step_s": statistics.median(max(x["total_time"] for x in rs) for rs in by_step.values())}
            log(f"  per-rank cost max/mean {r['cost_max_over_mean']:.3f} (predicted), compute time max/mean "
                f"{r['time_max_over_mean']:.3f} (measured), step {r['step_s'] * 1e3:.0f} ms (medians over steps)")
    return results
