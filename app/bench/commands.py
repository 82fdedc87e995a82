"""The table of `exaforce bench` subcommands: name, help, the arguments, the run.

The CLI walks BENCHMARKS to build `exaforce bench …` (adding `--json` to each) and calls the
chosen entry's `run(args, log)`, which returns the result it prints as JSON. Importing this
module is cheap: each run imports its benchmark module only when it is called.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

Log = Callable[[str], None]


@dataclass(frozen=True)
class Benchmark:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Log], dict | None]  # None: a rank other than 0 under mpiexec


def _dtype(parser: argparse.ArgumentParser, default: str = "float32") -> None:
    parser.add_argument("--dtype", default=default, choices=["float32", "float64"])


def _rank_counts(text: str) -> list[int]:
    return [int(r) for r in text.split(",")]


def _step_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="base", help="model preset (default base)")
    p.add_argument("--workload", default="dense", choices=["dense", "small"],
                   help="dense: fcc/bcc/hcp metal and alloy cells of 32-108 atoms (default); "
                        "small: `data synth` seed 0 cells")
    p.add_argument("--batch", type=int, help="structures per step: one batch size (default: --batches)")
    p.add_argument("--batches", type=_rank_counts,
                   help="comma-separated batch sizes, one worker process each (default 1,2,4,8 for dense, "
                        "--batch or 4 for small)")
    _dtype(p)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--repeats", type=int, default=10, help="timed steps; the median is reported (default 10)")
    p.add_argument("--compare", type=_compare_names, default=[],
                   help="comma-separated, each measured the same way: store (exaforce without recomputation, "
                        "run.recompute_lines = 0), sums (the line attention's sums stored, run.recompute_bonds = "
                        "false), kept (freed heap pages kept resident, run.release_host_memory = false), "
                        "matris (MatRIS at the preset's width and depth), mace "
                        "(MACE-MP-0-medium-like); the references need envs/local/requirements-reference.txt")
    p.add_argument("--runs", type=int, default=1,
                   help="fresh worker processes per (model, batch); medians are reported (default 1)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "xpu"],
                   help="where exaforce's step runs (default cpu; auto: a visible GPU, else the CPU); the "
                        "references run on the CPU")
    p.add_argument("--mem-limit-gib", type=float, default=20.0,
                   help="address-space cap per worker (RLIMIT_AS), GiB; a batch over it is reported as out "
                        "of memory (default 20). Peak memory is each worker's true peak RSS from its start")


def _compare_names(text: str) -> list[str]:
    from exaforce.bench.step import COMPARABLE

    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in COMPARABLE]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)} (known: {', '.join(COMPARABLE)})")
    return names


def _step_batches(args: argparse.Namespace) -> list[int]:
    if args.batches:
        return args.batches
    if args.batch is not None:
        return [args.batch]
    return [1, 2, 4, 8] if args.workload == "dense" else [4]


def _run_step(args: argparse.Namespace, log: Log) -> dict:
    from exaforce.bench.step import bench_step
    from exaforce.config import model_preset

    model_preset(args.preset)  # a bad name fails before any work
    if args.runs < 1:
        raise ValueError(f"--runs {args.runs}: must be >= 1")
    return bench_step(args.preset, args.workload, _step_batches(args), args.dtype, args.warmup, args.repeats,
                      args.compare, args.mem_limit_gib, log, args.runs, args.device)


def _ep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="small-moe", help="MoE model preset (default small-moe)")
    p.add_argument("--experts", type=int, help="override the preset's experts per MoE layer")
    p.add_argument("--ranks", type=int, default=2, help="MPI ranks of both runs (default 2)")
    p.add_argument("--ep", type=int, default=2, help="expert-parallel degree of the second run (default 2)")
    p.add_argument("--batch-per-rank", type=int, default=2, help="structures per rank per step (default 2)")
    p.add_argument("--steps", type=int, default=12, help="training steps per run (default 12)")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median (default 2)")
    _dtype(p)
    p.add_argument("--no-baseline", action="store_true", help="skip the ep=1 run (a model too big for one rank)")
    p.add_argument("--recompute-lines", type=int,
                   help="run.recompute_lines of both runs (default: the config default; 0: store every intermediate)")
    p.add_argument("--skew", action="store_true",
                   help="static against dynamic expert placement (ep = ranks) on a skewed two-fidelity composition "
                        "(80%% of metal atoms Cu or Au, GFN2 molecules): expert work max/mean over EP ranks, step "
                        "time, all-to-all bytes")
    p.add_argument("--replace-every", type=int, default=2, help="--skew: parallel.replace_experts_every (default 2)")
    p.add_argument("--replicas", type=int, default=1, help="--skew: parallel.expert_replicas (default 1)")
    p.add_argument("--resident-experts", type=int, default=0,
                   help="--skew: also the dynamic run with experts offloaded, this many resident per layer (default 0: not)")


def _run_ep(args: argparse.Namespace, log: Log) -> dict:
    from exaforce.bench.runs import bench_ep, bench_ep_skew

    if args.skew:
        return bench_ep_skew(args.preset, args.ranks, args.experts, args.batch_per_rank, args.steps, args.warmup,
                             args.replace_every, args.replicas, args.resident_experts, args.dtype, log)
    return bench_ep(args.preset, args.ranks, args.ep, args.experts, args.batch_per_rank, args.steps, args.warmup,
                    args.dtype, not args.no_baseline, log, args.recompute_lines)


def _comm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="base", help="model preset (default base)")
    p.add_argument("--ranks", type=int, default=2, help="data-parallel ranks (default 2)")
    p.add_argument("--backends", default="mpi,horovod,torch", help="comma-separated (default mpi,horovod,torch)")
    p.add_argument("--batch-per-rank", type=int, default=2, help="structures per rank per step (default 2)")
    p.add_argument("--steps", type=int, default=10, help="training steps per run (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median (default 2)")
    _dtype(p)


def _run_comm(args: argparse.Namespace, log: Log) -> dict:
    from exaforce.bench.runs import bench_comm

    return bench_comm(args.preset, args.ranks, args.batch_per_rank, args.steps, args.warmup, args.dtype,
                      args.backends.split(","), log)


def _balance_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--structures", type=int, default=200, help="metals and GFN2 molecules each; GFN1: half")
    p.add_argument("--ranks", type=int, default=2, help="MPI ranks (default 2)")
    p.add_argument("--steps", type=int, default=30, help="training steps per run (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the medians (default 3)")


def _run_balance(args: argparse.Namespace, log: Log) -> dict:
    from exaforce.bench.runs import bench_balance

    return bench_balance(args.structures, args.ranks, args.steps, args.warmup, log)


def _io_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--structures", type=int, default=2000, help="EMT structures from data synth (default 2000)")
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts (default 1,2)")
    p.add_argument("--repeats", type=int, default=5, help="repeats; medians are reported (default 5)")


def _run_io(args: argparse.Namespace, log: Log) -> dict:
    from exaforce.bench.readers import bench_io

    return bench_io(args.structures, _rank_counts(args.ranks), args.repeats, log)


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="base", help="model preset, random weights (default base)")
    p.add_argument("--structures", type=int, default=200, help="EMT structures, synth seed 0 (default 200)")
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts (default 1,2)")
    p.add_argument("--batch-size", type=int, default=16, help="structures per batch (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="runs per rank count; medians are reported (default 3)")
    _dtype(p)
    p.add_argument("--compare", choices=["matris"], help="also time the reference model on the same structures")


def _run_predict(args: argparse.Namespace, log: Log) -> dict:
    from exaforce.bench.predict import bench_predict
    from exaforce.config import model_preset

    model_preset(args.preset)  # a bad name fails before any work
    return bench_predict(args.preset, args.structures, _rank_counts(args.ranks), args.batch_size, args.repeats,
                         args.dtype, args.compare, log)


def _md_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="trained checkpoint (e.g. demo/run/checkpoints/…)")
    p.add_argument("--steps", type=int, default=1000, help="NVE steps (default 1000: 1 ps at 1 fs)")
    p.add_argument("--temperature", type=float, default=300.0,
                   help="Maxwell-Boltzmann start and Langevin temperature, K (default 300)")
    p.add_argument("--langevin-steps", type=int, default=0,
                   help="Langevin steps before the NVE run, with a check that it stays physical (closest pair "
                        "≥ 1.5 Å, mean temperature within 15 %%); default 0")
    p.add_argument("--timestep", type=float, default=1.0, help="fs (default 1)")
    p.add_argument("--nve-timestep", type=float, help="fs of the NVE run (default: --timestep)")
    p.add_argument("--cells", type=_rank_counts, default=[3, 3, 3],
                   help="conventional fcc cells along a,b,c (default 3,3,3: 108 atoms)")
    p.add_argument("--graph-parallel", nargs="?", const="auto", default=False, choices=["auto", "exchange", "ghost"],
                   help="under mpiexec -n K: the cell's atoms split over the K ranks (graph parallelism); the "
                        "halo as predict --gp-halo (default auto)")
    _dtype(p, default="float64")


def _run_md(args: argparse.Namespace, log: Log) -> dict | None:
    from exaforce.bench.md import bench_md
    from exaforce.config import ConfigError

    if len(args.cells) != 3 or min(args.cells) < 1:
        raise ConfigError(f"bench md --cells {','.join(map(str, args.cells))}: three counts >= 1")
    return bench_md(args.checkpoint, args.steps, args.temperature, args.dtype, log, args.langevin_steps,
                    args.timestep, args.nve_timestep, tuple(args.cells), args.graph_parallel)


def _soak_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=2000, help="training steps (default 2000)")
    p.add_argument("--ranks", type=int, default=2, help="MPI ranks (default 2)")
    p.add_argument("--every", type=int, default=100,
                   help="steps between RSS rows, validations and checkpoints (default 100)")
    p.add_argument("--warmup", type=int, default=200, help="growth is measured from this step on (default 200)")


def _run_soak(args: argparse.Namespace, log: Log) -> dict:
    from exaforce.bench.soak import bench_soak

    return bench_soak(args.steps, args.ranks, args.every, args.warmup, log)


def _accuracy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", type=float, default=900.0,
                   help="wall-time budget of each training run, start-up included, s (default 900)")
    p.add_argument("--seeds", type=_rank_counts, default=[0], help="comma-separated data/model seeds (default 0)")
    p.add_argument("--config", type=Path, help="TOML whose [model], [loss], [optim], [run] keys override the "
                                               "project's defaults (default: the defaults)")
    p.add_argument("--ranks", type=int, default=2,
                   help="MPI ranks of the exaforce run, and threads of the reference's process (default 2)")
    p.add_argument("--compare", type=lambda text: [n for n in text.split(",") if n], default=[],
                   help="mace: MACE-small through its own run_train, the same data and budget "
                        "(needs envs/local/requirements-reference.txt)")
    p.add_argument("--keep", type=Path, help="copy each seed's exaforce model file to KEEP/seed-N.pt "
                                             "(`bench md` runs MD with it); default: nothing kept")


def _run_accuracy(args: argparse.Namespace, log: Log) -> dict:
    from exaforce.bench.accuracy import bench_accuracy

    return bench_accuracy(args.budget, args.seeds, args.config, args.ranks, args.compare, log, keep=args.keep)


def _pp_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="demo", help="model preset (default demo)")
    p.add_argument("--blocks", type=int, default=4, help="interaction blocks, split over the stages (default 4)")
    p.add_argument("--workload", default="dense", choices=["dense", "small"], help="as in bench step (default dense)")
    p.add_argument("--batch", type=int, default=8, help="structures in the global batch (default 8)")
    p.add_argument("--micro-batches", type=int, default=8, help="micro-batches per step (default 8)")
    p.add_argument("--stages", type=_rank_counts, default=[2, 4], help="comma-separated pp values (default 2,4)")
    p.add_argument("--schedules", type=lambda t: [n for n in t.split(",") if n], default=["gpipe", "folded"],
                   help="comma-separated (default gpipe,folded)")
    p.add_argument("--chunks", type=_rank_counts, default=[1],
                   help="folded: stages per pipeline rank (parallel.pp_chunks), comma-separated; each is measured "
                        "(pp · chunks <= --blocks; default 1)")
    p.add_argument("--alive", type=int, default=0,
                   help="folded: most micro-batches alive per stage (default 0: chosen by simulation)")
    _dtype(p)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps; the median is reported (default 3)")
    p.add_argument("--simulate", type=_rank_counts, default=[8, 16, 32, 64],
                   help="pp values the simulator replays the measured phase costs at, 2·pp micro-batches each "
                        "(default 8,16,32,64; pp = 8 with 16 micro-batches is always added)")


def _run_pp(args: argparse.Namespace, log: Log) -> dict:
    from exaforce.bench.pp import bench_pp
    from exaforce.config import PP_SCHEDULES, ConfigError, model_preset

    model_preset(args.preset)  # a bad name fails before any work
    unknown = [s for s in args.schedules if s not in PP_SCHEDULES]
    if unknown:
        raise ConfigError(f"bench pp --schedules: unknown {', '.join(unknown)} (known: {', '.join(PP_SCHEDULES)})")
    if any(pp < 2 or pp > args.blocks for pp in args.stages):
        raise ConfigError(f"bench pp --stages {','.join(map(str, args.stages))}: each from 2 to --blocks ({args.blocks})")
    if any(pp * chunks > args.blocks for pp in args.stages for chunks in args.chunks) or min(args.chunks) < 1:
        raise ConfigError(f"bench pp --chunks {','.join(map(str, args.chunks))}: each >= 1 with pp · chunks <= "
                          f"--blocks ({args.blocks}) at every --stages value")
    if not 1 <= args.micro_batches <= args.batch:
        raise ConfigError(f"bench pp --micro-batches {args.micro_batches}: from 1 to --batch ({args.batch})")
    return bench_pp(args.preset, args.workload, args.batch, args.micro_batches, args.stages, args.schedules,
                    args.chunks, args.alive, args.dtype, args.warmup, args.repeats, args.blocks, args.simulate, log)


def _gp_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--atoms", type=int, default=1000, help="atoms of the large cell, about (default 1000)")
    p.add_argument("--shape", default="cube", choices=["cube", "rod"],
                   help="cube, or a rod 4 × 4 fcc cells across (14.8 Å) and long (default cube)")
    p.add_argument("--ranks", type=_rank_counts, default=[2, 4], help="comma-separated GP sizes run at --atoms "
                                                                       "(default 2,4; 1: one rank at --atoms)")
    p.add_argument("--single-atoms", type=lambda t: [int(x) for x in t.split(",") if x], default=[250, 500],
                   help="comma-separated cell sizes run on one rank, to project one rank's memory and time at "
                        "--atoms (default 250,500; empty: none)")
    p.add_argument("--preset", default="demo", help="model preset (default demo)")
    _dtype(p)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--repeats", type=int, default=2, help="timed steps; the median is reported (default 2)")
    p.add_argument("--budget-gib", type=float, default=0.0,
                   help="a memory budget per rank, GiB: says whether one rank and the GP group fit it (default: none)")
    p.add_argument("--halo", type=_halos, default=("ghost", "exchange"),
                   help="comma-separated halo modes run at each GP size: ghost, exchange (default both)")


def _halos(text: str) -> tuple[str, ...]:
    halos = tuple(h for h in text.split(",") if h)
    unknown = [h for h in halos if h not in ("ghost", "exchange")]
    if unknown or not halos:
        raise argparse.ArgumentTypeError(f"unknown halo mode {', '.join(unknown) or '(none)'} (known: ghost, exchange)")
    return halos


def _run_gp(args: argparse.Namespace, log: Log) -> dict:
    from exaforce.bench.gp import bench_gp
    from exaforce.config import model_preset

    model_preset(args.preset)  # a bad name fails before any work
    return bench_gp(args.atoms, args.shape, args.ranks, args.single_atoms, args.preset, args.dtype, args.warmup, args.repeats,
                    args.budget_gib, log, args.halo)


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("step", "median full training step (forward, forces/stress with create_graph, loss, backward, "
              "optimizer) after warm-up", _step_arguments, _run_step),
    Benchmark("ep", "expert parallel (dp=R/ep, ep) against data parallel (dp=R, ep=1) at the same per-rank batch: "
              "step time, all-to-all and reduction shares", _ep_arguments, _run_ep),
    Benchmark("comm", "gradient-reduction time per step for each backend, with the reduction overlapping the "
              "backward and after it", _comm_arguments, _run_comm),
    Benchmark("balance", "per-rank cost and time imbalance on the demo's multi-fidelity data: cost-balanced deal "
              "against round-robin", _balance_arguments, _run_balance),
    Benchmark("io", "reader throughput (BP5, HDF5 via h5py, extxyz via ASE) on 1 and 2 ranks, and staging "
              "bandwidth against cp", _io_arguments, _run_io),
    Benchmark("predict", "`exaforce predict` throughput on 1, 2, … ranks (EMT structures from data synth), "
              "optionally beside the MatRIS reference model's inference", _predict_arguments, _run_predict),
    Benchmark("md", "108-atom Cu through the ASE calculator: optional hot Langevin run that must stay physical, "
              "then NVE energy drift", _md_arguments, _run_md),
    Benchmark("accuracy", "what a training run of a fixed wall-time budget learns: energy/force/stress MAE on "
              "unseen dense EMT cells and 500 K MD frames", _accuracy_arguments, _run_accuracy),
    Benchmark("pp", "pipeline schedules on real ranks (gpipe against folded): per-phase work per stage, bubble, "
              "step time and memory per rank against pp = 1; the simulator at pp = 8 … 64", _pp_arguments, _run_pp),
    Benchmark("gp", "one large cell's training step with its atoms split over 1, 2, 4 ranks (graph parallelism): "
              "step time, peak memory per rank, halo work and volume, communication share", _gp_arguments, _run_gp),
    Benchmark("soak", "a long run must not grow: each rank's resident memory over 2,000 steps of the small "
              "preset on 2 ranks, validation and checkpoints included", _soak_arguments, _run_soak),
)
