"""The `exaforce` command line. Only this module (and job templates) read the environment.

Every bad input ends with one line `exaforce: error: <file>: frame K: ...` on stderr and a
non-zero exit; under MPI a failing rank aborts the whole job instead of leaving the others
waiting in a collective.

Each command is a handler registered with `@command(path…, help=…, arguments=…)` beside the
function that adds its arguments; `build_parser` walks the table, `run_command` owns the errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from exaforce.bench.commands import Benchmark
    from exaforce.parallel.topology import Topology

EXIT_BAD_INPUT = 2


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""


@dataclass
class Context:
    """What a handler leaves for run_command: the job's Topology once it exists, so that a failure
    aborts the other ranks instead of leaving them in a collective."""

    topo: Topology | None = None
    run_dir: Path | None = None  # where an abort records its reason (exaforce.faults.report)


Handler = Callable[[argparse.Namespace, Context], None]
AddArguments = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]  # ("data", "synth") is `exaforce data synth`
    help: str
    add_arguments: AddArguments
    handler: Handler


GROUP_HELP = {"data": "make, convert and inspect datasets",
              "perf": "performance reports from per-rank perf logs",
              "jobs": "job scripts for Frontier, Aurora, Perlmutter, any Slurm, this host; scaling campaigns",
              "model": "model presets and sizes",
              "bench": "benchmarks"}
COMMANDS: list[Command] = []  # in the order `exaforce --help` lists them


def command(*path: str, help: str, arguments: AddArguments) -> Callable[[Handler], Handler]:
    """Registers the decorated handler as `exaforce PATH…`."""
    def register(handler: Handler) -> Handler:
        COMMANDS.append(Command(path, help, arguments, handler))
        return handler

    return register


def _say(message: str) -> None:
    print(message, flush=True)


def _quiet(message: str) -> None:
    """What every rank but the one that speaks says."""


def _error(message: str) -> None:
    print(f"exaforce: error: {message}", file=sys.stderr, flush=True)


def _fail(message: str, topo: Topology | None) -> None:
    _error(message)
    if topo is not None and topo.world_size > 1:
        from exaforce.faults import abort_world

        abort_world(topo.world, EXIT_BAD_INPUT)  # the other ranks may be inside a collective
    raise SystemExit(EXIT_BAD_INPUT)


def _user_errors() -> tuple[type[BaseException], ...]:
    from exaforce.config import ConfigError
    from exaforce.io.atomic import DiskFullError
    from exaforce.io.schema import DataError
    from exaforce.io.stage import StageError
    from exaforce.jobs import JobError
    from exaforce.parallel.topology import TopologyError
    from exaforce.predict import PredictError

    return (ConfigError, DataError, DiskFullError, JobError, StageError, TopologyError, PredictError, UserError)


def run_command(handler: Handler, args: argparse.Namespace) -> None:
    """Runs one handler; the one place a failure becomes an exit status. A user error is one line
    and exit 2 (aborting the other ranks); RunStopped exits with its code on every rank alike; any
    other exception once a topology exists aborts the whole job with this rank's traceback."""
    from exaforce.faults import RunStopped, abort_job
    from exaforce.io.atomic import NO_SPACE_ERRNOS

    ctx = Context()
    try:
        handler(args, ctx)
    except _user_errors() as exc:  # imported only when something went wrong
        _fail(str(exc), ctx.topo)
    except RunStopped as stop:  # every rank decided it together: a clean exit with its code, no abort
        raise SystemExit(stop.exit_code) from None
    except Exception as exc:  # perhaps on this rank alone: abort them all rather than leave them waiting
        if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS:  # a write without its own DiskFullError
            _fail(f"{exc.filename or 'a write'}: no space left on device ({exc.strerror})", ctx.topo)
        if ctx.topo is None:
            raise
        abort_job(ctx.topo.world, exc, ctx.run_dir)


# ---------------------------------------------------------------- data
def _synth_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", choices=("metals", "dense-metals", "skewed-metals", "molecules"), default="metals",
                   help="metals: EMT-labelled fcc/bcc/hcp cells of 1-32 atoms with stress; dense-metals: the "
                        "same kind of cells at 32-108 atoms (`bench step`'s dense workload); skewed-metals: dense "
                        "cells with 80%% of atoms Cu or Au (`bench ep --skew`); molecules: rattled G2 molecules in "
                        "vacuum, energy and forces from tblite (default metals)")
    p.add_argument("--method", choices=("GFN2-xTB", "GFN1-xTB"), default=None,
                   help="tblite method for --source molecules (default GFN2-xTB)")
    p.add_argument("--out", required=True, help="extxyz file to write")
    p.add_argument("--structures", type=int, default=200, help="number of structures (default 200)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


@command("data", "synth", arguments=_synth_arguments,
         help="labelled structures as extxyz: periodic metals (EMT) or molecules (GFN2-/GFN1-xTB via tblite)")
def cmd_data_synth(args: argparse.Namespace, ctx: Context) -> None:
    from exaforce.console import ProgressReport
    from exaforce.io.extxyz import write_extxyz

    if args.structures < 1:
        raise UserError(f"--structures {args.structures}: must be >= 1")
    if args.method is not None and args.source != "molecules":
        raise UserError(f"--method {args.method}: only for --source molecules (metals are labelled by EMT)")
    method = (args.method or "GFN2-xTB") if args.source == "molecules" else "EMT"
    t0 = time.perf_counter()
    with ProgressReport(f"labelling with {method}", stream=sys.stdout) as progress:
        if args.source in ("metals", "dense-metals", "skewed-metals"):
            from exaforce.bench.workloads import workload_structures

            workload = {"metals": "small", "dense-metals": "dense", "skewed-metals": "skewed"}[args.source]
            atoms = workload_structures(workload, args.structures, args.seed, progress=progress)
        else:
            from exaforce.io.molecules import synthesize_molecules

            try:
                atoms = synthesize_molecules(args.structures, args.seed, method=method, progress=progress)
            except ModuleNotFoundError as err:
                if err.name != "tblite":
                    raise
                raise UserError(f"--source molecules: {err}") from None
    write_extxyz(atoms, args.out)
    n_atoms = sum(len(a) for a in atoms)
    _say(f"wrote {len(atoms)} structures ({n_atoms} atoms) to {args.out} in {time.perf_counter() - t0:.1f} s")


def _convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="labelled structures, format by suffix: .xyz/.extxyz, .db (ASE SQLite database), "
                        ".aselmdb (fairchem's ASE LMDB database), .h5/.hdf5 (layout in io/SCHEMA.md)")
    p.add_argument("--out", required=True, help="one input: the dataset directory to write (DIR.bp); "
                   "several: a folder that receives OUT/<stem>.bp for each, all or none")
    p.add_argument("--name", required=True, help="dataset name (a fidelity/source label), given to every output")
    p.add_argument("--method", help="level of theory of the labels, e.g. EMT, PBE, GFN2-xTB "
                   "(default: the input's own, as an HDF5 file stores it, else 'unknown')")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset (or folder of "
                   "datasets) atomically")
    for label in ("energy", "forces", "stress"):
        p.add_argument(f"--{label}-key", default=label, metavar="KEY",
                       help=f"name of the {label} label in extxyz info/arrays or ASE db key-value pairs/data "
                            f"(default {label!r}, else MACE's 'REF_{label}')")


@command("data", "convert", arguments=_convert_arguments,
         help="extxyz / ASE db / HDF5 → ADIOS2 BP5 dataset(s); several inputs are converted in parallel "
              "under mpiexec")
def cmd_data_convert(args: argparse.Namespace, ctx: Context) -> None:
    from exaforce.console import ProgressReports
    from exaforce.io.convert import Converted, Progress, convert
    from exaforce.io.schema import DataError, LabelKeys
    from exaforce.parallel.topology import Topology

    ctx.topo = topo = Topology.from_mpi()
    t0 = time.perf_counter()
    tag = f"rank {topo.rank}: " if topo.world_size > 1 else ""

    def log(done: Converted) -> None:
        _say(f"{tag}converted {done.n_structures} structures ({done.n_atoms} atoms, method {done.method}) "
             f"from {done.source} to {done.out} in {time.perf_counter() - t0:.1f} s")

    reports = ProgressReports(enabled=topo.is_root, stream=sys.stdout)  # rank 0's files (the others convert alike)

    def progress(source: Path) -> Progress:
        return functools.partial(reports, f"{tag}reading {source.name}")

    sources = [Path(p) for p in args.inputs]
    try:
        keys = LabelKeys(energy=args.energy_key, forces=args.forces_key, stress=args.stress_key)
        outcome = convert(sources, Path(args.out), args.name, args.method, args.overwrite, topo.world, log, keys,
                          progress)
    except DataError as exc:  # the same refusal on every rank: one of them says it
        if topo.is_root:
            _error(str(exc))
        raise SystemExit(EXIT_BAD_INPUT) from None
    for message in outcome.failures:  # every rank reports its own
        _error(message)
    if outcome.n_failed:  # every rank knows the total, so every rank exits with the same status
        if topo.is_root and len(sources) > 1:
            _error(f"{outcome.n_failed} of {len(sources)} inputs failed; nothing written to {args.out}")
        raise SystemExit(EXIT_BAD_INPUT)
    if topo.is_root and len(sources) > 1:
        _say(f"wrote {len(sources)} datasets to {args.out} in {time.perf_counter() - t0:.1f} s")


def _inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", help="dataset directory (DIR.bp)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")


@command("data", "inspect", arguments=_inspect_arguments,
         help="counts, elements, method, schema version, label statistics and attributes of a BP5 dataset")
def cmd_data_inspect(args: argparse.Namespace, ctx: Context) -> None:
    from exaforce.io.summary import format_summary, summarize

    info = summarize(args.dataset)
    print(json.dumps(info) if args.json else format_summary(info), flush=True)


# ---------------------------------------------------------------- stage
def _stage_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("datasets", nargs="*", help="datasets (DIR.bp) or files to stage")
    p.add_argument("--config", help="also stage every dataset of this run config (train with --set data.stage_dir=DIR)")
    p.add_argument("--to", required=True, help="node-local folder, e.g. /mnt/bb/$USER or $TMPDIR")
    p.add_argument("--fallback", action="store_true",
                   help="when staging fails (no space, no permission), warn and use the sources in place")


@command("stage", arguments=_stage_arguments,
         help="copy datasets to node-local storage (node leaders copy, all verify)")
def cmd_stage(args: argparse.Namespace, ctx: Context) -> None:
    from exaforce import config as config_mod
    from exaforce.console import ProgressReports
    from exaforce.io.stage import stage_datasets
    from exaforce.parallel.topology import Topology

    ctx.topo = topo = Topology.from_mpi()
    sources = [Path(p) for p in args.datasets]
    if args.config:
        sources += [Path(d.path) for d in config_mod.load(args.config).data.listed()]
    if not sources:
        raise config_mod.ConfigError("nothing to stage: name datasets or --config")
    log = _say if topo.local_rank == 0 else _quiet
    reports = ProgressReports(unit="MB", scale=1e-6, enabled=topo.is_root, stream=sys.stdout)  # rank 0's node
    staged = stage_datasets(sources, Path(args.to), topo.node, log=log, fallback=args.fallback,
                            progress=lambda what, done, total: reports(f"stage: {what}", done, total))
    if topo.is_root:
        for path in staged:
            _say(f"staged: {path}")


# ---------------------------------------------------------------- train
def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="TOML run configuration")
    p.add_argument("--out-dir", help="override run.out_dir")
    p.add_argument("--steps", type=int, help="override run.steps")
    p.add_argument("--resume", nargs="?", const="latest", metavar="latest|PATH",
                   help="override run.resume: continue from the run folder's newest complete checkpoint "
                        "(latest, the default; a new run when there is none) or from checkpoint folder PATH")
    p.add_argument("--init-from", metavar="CHECKPOINT", help="override run.init_from: fine-tune from this "
                   "checkpoint (file or run folder); heads missing from it start as the mean of its heads")
    p.add_argument("--freeze", choices=("none", "backbone"), help="override run.freeze: with --init-from, "
                   "train everything (none) or only the readout and head embeddings (backbone)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (TOML syntax), repeatable: --set data.global_batch_size=64")


@command("train", arguments=_train_arguments, help="train a potential (run under mpiexec -n N)")
def cmd_train(args: argparse.Namespace, ctx: Context) -> None:
    """Exit status: 0 done; REQUEUE_EXIT_CODE (75) checkpointed after SIGTERM/SIGUSR1, resubmit with
    --resume; NONFINITE_EXIT_CODE (3) stopped on a non-finite step; 2 bad input; 1 a rank failed
    (every rank aborted). See exaforce.faults."""
    from exaforce.faults import StopSignals  # torch-free: the handlers are in place before the heavy imports

    resume = args.resume if args.resume in (None, "latest") else str(Path(args.resume).resolve())
    with StopSignals() as signals:  # from here SIGTERM/SIGUSR1 mean: stop at the next step boundary (or start-up's end)
        from exaforce import config as config_mod
        from exaforce.comm.groups import build_groups
        from exaforce.device import describe, rank_device
        from exaforce.parallel.topology import Topology
        from exaforce.training.run import train

        cfg = config_mod.load(args.config, args.set)
        overrides = {k: v for k, v in (("out_dir", args.out_dir), ("steps", args.steps), ("resume", resume),
                                       ("init_from", args.init_from), ("freeze", args.freeze)) if v is not None}
        cfg = config_mod.validate(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, **overrides)))
        ctx.run_dir = Path(cfg.run.out_dir)
        ctx.topo = topo = Topology.from_mpi(dp=cfg.parallel.dp, ep=cfg.parallel.ep, pp=cfg.parallel.pp,
                                             gp=cfg.parallel.gp)
        device = rank_device(cfg.run.device, topo)  # collective
        groups = build_groups(cfg.comm.backend, topo, device)  # collective: once per run, right after the topology
        log = _say if topo.is_root else _quiet
        log(topo.table(describe(device)))  # collective
        log(groups.describe())
        run_dir = train(cfg, topo, groups, log, signals, device)
    log(f"run folder: {run_dir}")


# ---------------------------------------------------------------- predict
def _predict_arguments(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="trained checkpoint (file, or a run folder: its latest)")
    which.add_argument("--preset", help="a model preset with seeded random weights (benchmarks)")
    p.add_argument("--seed", type=int, default=0, help="seed of --preset's random weights (default 0)")
    p.add_argument("--data", required=True, help="input dataset (DIR.bp)")
    p.add_argument("--out", required=True, help="output dataset (DIR.bp): the input's structures, predicted labels")
    p.add_argument("--head", help="energy head (dataset/fidelity) to predict with (default: the model's first)")
    p.add_argument("--batch-size", type=int, default=16, help="structures per batch (default 16); the numbers "
                   "depend on it, never on the number of ranks")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "xpu"],
                   help="auto (default: the rank's GPU when one is visible, else the CPU) | cpu | cuda | xpu")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out atomically")
    p.add_argument("--gp", type=int, default=1, help="graph parallelism: groups of GP ranks split each structure's "
                   "atoms between them (a structure larger than one rank's memory); must divide the ranks (default 1)")
    p.add_argument("--gp-halo", default="auto", choices=["auto", "exchange", "ghost"],  # config.GP_HALOS (no torch import here)
                   help="with --gp: exchange (one hop of halo refreshed from its owners twice per block; light "
                        "block only), ghost (each rank computes its halo out to the receptive field) or auto "
                        "(default: exchange for the light block, ghost for matris)")
    p.add_argument("--json", action="store_true", help="last line: one JSON object (counts, seconds, throughput)")


@command("predict", arguments=_predict_arguments,
         help="energies, forces and stress of every structure of a BP5 dataset (run under mpiexec -n N), "
              "written as a BP5 dataset; throughput reported")
def cmd_predict(args: argparse.Namespace, ctx: Context) -> None:
    from exaforce.parallel.topology import Topology
    from exaforce.predict import ModelSource, predict

    ctx.topo = topo = Topology.from_mpi(gp=args.gp)
    log = _say if topo.is_root else _quiet
    source = ModelSource(checkpoint=args.checkpoint, preset=args.preset, seed=args.seed)
    summary = predict(source, args.data, args.out, topo, batch_size=args.batch_size, head=args.head,
                      dtype=args.dtype, overwrite=args.overwrite, log=log, device=args.device, halo=args.gp_halo)
    if args.json and topo.is_root:
        print(json.dumps(summary), flush=True)


# ---------------------------------------------------------------- lammps
def _lammps_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="trained model (file, checkpoint folder, or run folder)")
    p.add_argument("--in", dest="script", required=True, type=Path,
                   help="LAMMPS input script (units metal) with `fix ID all external pf/callback 1 1` and "
                        "`fix_modify ID energy yes virial yes` (exaforce.lammps)")
    p.add_argument("--elements", required=True, type=lambda text: [e for e in text.split(",") if e],
                   help="element of each LAMMPS atom type, in type order: Cu,Au means type 1 Cu, type 2 Au")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])


@command("lammps", arguments=_lammps_arguments,
         help="run a LAMMPS input script with an exaforce model as its forces (fix external; under mpiexec -n N)")
def cmd_lammps(args: argparse.Namespace, ctx: Context) -> None:
    from exaforce.lammps import run_input
    from exaforce.parallel.topology import Topology

    ctx.topo = topo = Topology.from_mpi()
    log = _say if topo.is_root else _quiet
    try:
        run_input(args.script, args.checkpoint, args.elements, args.dtype, log).close()
    except (ValueError, OSError) as err:
        raise UserError(str(err)) from None


# ---------------------------------------------------------------- perf
def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_OR_CAMPAIGN_DIR",
                   help="run folder (holds perf/rank-*.jsonl) or campaign folder (holds campaign.json)")
    p.add_argument("--out", help="report folder (default RUN_OR_CAMPAIGN_DIR/report)")


@command("perf", "report", arguments=_report_arguments,
         help="Markdown + HTML report with plots (PNG, SVG) of a run, or of a scaling campaign (speed-up, "
              "efficiency, EFLOPS, full-machine projection)")
def cmd_perf_report(args: argparse.Namespace, ctx: Context) -> None:
    from exaforce.perf.campaign import CAMPAIGN_FILE, summarize_campaign
    from exaforce.perf.render import (format_campaign, format_search, format_summary, write_campaign_report,
                                      write_report, write_search_report)
    from exaforce.perf.runlog import load_run
    from exaforce.perf.search import SEARCH_FILE, summarize_search
    from exaforce.perf.summary import summarize

    target = Path(args.run_dir)
    out = Path(args.out) if args.out else None
    if (target / SEARCH_FILE).is_file():
        summary = summarize_search(target)
        path = write_search_report(target, out, summary)
        _say(format_search(summary))
    elif (target / CAMPAIGN_FILE).is_file():
        summary = summarize_campaign(target)
        path = write_campaign_report(target, out, summary)
        _say(format_campaign(summary))
    else:
        summary = summarize(load_run(target))  # read the logs once
        path = write_report(target, out, summary)
        _say(format_summary(summary))
    _say(f"report: {path} (and report.html beside it)")


# ---------------------------------------------------------------- jobs
def _job_arguments(p: argparse.ArgumentParser) -> None:
    """What every job script needs, one job or a campaign."""
    p.add_argument("--machine", required=True, choices=("frontier", "aurora", "perlmutter", "slurm", "local"))
    p.add_argument("--config", required=True, help="TOML run configuration")
    p.add_argument("--account", help="allocation to charge (Frontier, Aurora, Perlmutter)")
    p.add_argument("--partition", help="partition (Slurm), QOS (Perlmutter) or queue (PBS)")
    p.add_argument("--walltime", default="01:00:00", help="HH:MM:SS (default 01:00:00)")
    p.add_argument("--ranks-per-node", type=int, help="slurm and local only (one rank per GPU elsewhere)")
    p.add_argument("--job-name", default="exaforce")
    p.add_argument("--stage-dir", help="node-local dataset copies (default: the machine's NVMe or /tmp)")
    p.add_argument("--signal-lead", type=int, default=120,
                   help="seconds before the walltime at which the job checkpoints and requeues (default 120)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override passed to `exaforce train`, repeatable")


def _job_request(args: argparse.Namespace):
    from exaforce.jobs import JobRequest

    return JobRequest(config=Path(args.config), ranks_per_node=args.ranks_per_node, walltime=args.walltime,
                      account=args.account or "", partition=args.partition or "", job_name=args.job_name,
                      stage_dir=args.stage_dir or "", overrides=tuple(args.set), signal_lead_s=args.signal_lead,
                      nodes=getattr(args, "nodes", 1),
                      run_dir=Path(args.run_dir) if getattr(args, "run_dir", None) else None)


def _render_arguments(p: argparse.ArgumentParser) -> None:
    _job_arguments(p)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--run-dir", help="run folder (default: the config's run.out_dir)")
    p.add_argument("--out", help="write the script here (default: standard output)")


@command("jobs", "render", arguments=_render_arguments, help="one ready job script (sbatch, PBS or bash)")
def cmd_jobs_render(args: argparse.Namespace, ctx: Context) -> None:
    from exaforce.jobs import render_job

    request = _job_request(args)
    script = render_job(args.machine, request)
    if request.run_dir:
        request.run_dir.mkdir(parents=True, exist_ok=True)  # the scheduler opens the job's output file there
    if args.out:
        Path(args.out).write_text(script, encoding="utf-8")
        Path(args.out).chmod(0o755)
        _say(f"job script: {args.out}")
    else:
        print(script, end="")


def _campaign_arguments(p: argparse.ArgumentParser) -> None:
    _job_arguments(p)
    p.add_argument("--mode", required=True, choices=("strong", "weak", "search"),
                   help="strong: fixed global batch; weak: fixed batch per rank; search: a hyperparameter search "
                        "(Optuna samples --trials points of the --param space; each trial is one job)")
    p.add_argument("--nodes", dest="node_list", required=True,
                   help="node counts, e.g. 1,2,4,8 (local: groups of --ranks-per-node ranks on this host); "
                        "search: the nodes of every trial")
    p.add_argument("--batch-per-rank", type=int, help="weak mode (default: global batch / smallest point's ranks)")
    p.add_argument("--trials", type=int, default=8, help="search: trials (default 8)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=KIND:ARGS",
                   help="search: one dimension, repeatable: optim.lr=log:1e-4:1e-2, model.width=int:16:64, "
                        "optim.ema_decay=float:0.9:0.999, model.blocks=choice:1,2,3")
    p.add_argument("--seed", type=int, default=0, help="search: the sampler's seed (default 0)")
    p.add_argument("--out", required=True, help="campaign folder to create")


@command("jobs", "campaign", arguments=_campaign_arguments,
         help="one job per point of a strong- or weak-scaling campaign, a manifest and a submit script")
def cmd_jobs_campaign(args: argparse.Namespace, ctx: Context) -> None:
    from exaforce.jobs import JobError, render_campaign

    try:
        nodes = [int(n) for n in args.node_list.split(",")]
    except ValueError:
        raise JobError(f"--nodes {args.node_list!r}: a comma-separated list of node counts, e.g. 1,2,4,8") from None
    if args.mode == "search":
        from exaforce.search import parse_param, render_search

        if len(nodes) != 1 or nodes[0] < 1:
            raise JobError(f"--nodes {args.node_list!r}: a search runs every trial on one node count")
        request = dataclasses.replace(_job_request(args), nodes=nodes[0])
        out = render_search(args.machine, request, Path(args.out), [parse_param(p) for p in args.param], args.trials,
                            args.seed)
        _say(f"search: {out} ({args.trials} trials on {args.machine}); run them with {out}/submit.sh, then "
             f"`exaforce perf report {out}` ranks them")
        return
    out = render_campaign(args.machine, args.mode, nodes, _job_request(args), Path(args.out), args.batch_per_rank)
    _say(f"campaign: {out} ({len(nodes)} jobs, {args.mode} scaling on {args.machine}); submit with {out}/submit.sh, "
         f"then `exaforce perf report {out}`")


# ---------------------------------------------------------------- model
def _info_arguments(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", help="small | demo | small-moe | base | moe-100m | moe-1b: its size and shape")
    which.add_argument("--checkpoint", help="a model file or checkpoint folder (or a run folder: its newest): what "
                                            "it is, read from the file without building the model")
    p.add_argument("--json", action="store_true", help="one JSON object")


@command("model", "info", arguments=_info_arguments,
         help="a preset's parameter count and shape, or a trained model file's description")
def cmd_model_info(args: argparse.Namespace, ctx: Context) -> None:
    info = _checkpoint_info(args.checkpoint, args.json) if args.checkpoint else _preset_info(args.preset)
    if args.json:
        print(json.dumps(info))
        return
    for key, value in info.items():
        if isinstance(value, dict) and key == "heads":
            for head, h in value.items():
                refs = ", ".join(f"{el} {e:.4f}" for el, e in h["reference_energy_ev"].items())
                print(f"{'head ' + head:>22}: energy scale {h['energy_scale_ev']:.4g} eV; reference energies (eV) {refs}")
        elif isinstance(value, dict):
            print(f"{key:>22}: " + ", ".join(f"{k} {v}" for k, v in value.items()))
        else:
            print(f"{key:>22}: {value:,}" if isinstance(value, int) else f"{key:>22}: {value}")


def _preset_info(name: str) -> dict:
    from exaforce.config import model_preset
    from exaforce.model.potential import parameter_counts

    cfg = model_preset(name)
    counts = parameter_counts(cfg)  # built on the meta device: a 1e9-parameter preset costs no memory
    return {"preset": name, "params": counts["total"], "dense_params": counts["dense"],
            "expert_params": counts["expert"], "active_params_per_atom": counts["active_per_token"],
            "moe_layers": counts["moe_layers"], "experts": cfg.moe_experts, "top_k": cfg.moe_top_k,
            "width": cfg.width, "line_width": cfg.line_channels, "blocks": cfg.blocks, "edge_mlp_ratio": cfg.edge_mlp_ratio,
            "node_mlp_ratio": cfg.node_mlp_ratio, "cutoff": cfg.cutoff,
            "three_body_cutoff": cfg.three_body_cutoff, "elements": list(cfg.elements)}


def _checkpoint_info(path: str, full: bool) -> dict:
    """The model file's description; the whole model config with `full` (--json), else the fields people ask for."""
    from exaforce.model_io import load_trained

    info = load_trained(path).describe()
    if not full:
        info.pop("model_config")
    return info


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder, model file or run folder (its newest)")
    p.add_argument("--out", required=True, help="the model file to write: F.safetensors (weights as safetensors "
                                               "tensors, description as JSON metadata), F.pt (torch, weights only) "
                                               "or F.pt2 (a torch.export program for compiled MD codes: energy of "
                                               "a domain's own atoms and its gradient per edge vector)")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64", help=".pt2: the program's precision")
    p.add_argument("--head", help=".pt2: the energy head (default: the first)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")


@command("model", "export", arguments=_export_arguments,
         help="the whole model of a checkpoint as one file, .pt or .safetensors (predict, the ASE calculator, "
              "`exaforce lammps` and `model info` read both), or .pt2 for compiled MD codes")
def cmd_model_export(args: argparse.Namespace, ctx: Context) -> None:
    from exaforce.checkpoint import SAFETENSORS, write_model_file
    from exaforce.model_io import load_trained, read_model_state

    out = Path(args.out)
    if out.suffix not in (SAFETENSORS, ".pt", ".pt2"):
        raise UserError(f"--out {out}: the file name must end in {SAFETENSORS}, .pt or .pt2 (it chooses the format)")
    if (out.exists() or out.is_symlink()) and not (args.overwrite and out.is_file()):
        raise UserError(f"--out {out}: " + ("exists and is not a regular file; refusing to replace it"
                                            if out.exists() and not out.is_file() else
                                            "already exists (pass --overwrite to replace it)"))
    t0 = time.perf_counter()
    if out.suffix == ".pt2":
        import torch

        from exaforce.calculator import head_index
        from exaforce.program import write_program

        source = load_trained(args.checkpoint)
        model = source.build()
        try:
            head = head_index(model, args.head)
        except ValueError as err:
            raise UserError(f"--head: {err}") from None
        write_program(model, head, getattr(torch, args.dtype), source.describe(), out)
        path, step = source.path, source.step
    else:
        path, state = read_model_state(args.checkpoint)
        write_model_file(state, out)
        step = state["step"]
    _say(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB; step {step} of {path}) in {time.perf_counter() - t0:.2f} s")


# ---------------------------------------------------------------- bench
def _bench_arguments(bench: Benchmark, p: argparse.ArgumentParser) -> None:
    bench.add_arguments(p)
    p.add_argument("--json", action="store_true", help="last line: one JSON object")


def cmd_bench(bench: Benchmark, args: argparse.Namespace, ctx: Context) -> None:
    """Every `exaforce bench NAME`: the table entry's run, its result as JSON on request."""
    result = bench.run(args, _say)
    if args.json and result is not None:  # None: a rank other than 0 of a benchmark run under mpiexec
        print(json.dumps(result))


def _bench_commands() -> list[Command]:
    """`exaforce bench NAME` for each entry of exaforce.bench.commands (each with --json)."""
    from exaforce.bench.commands import BENCHMARKS

    return [Command(("bench", b.name), b.help, functools.partial(_bench_arguments, b),
                    functools.partial(cmd_bench, b)) for b in BENCHMARKS]


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from exaforce import __version__

    parser = argparse.ArgumentParser(prog="exaforce", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"exaforce {__version__}")
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for cmd in [*COMMANDS, *_bench_commands()]:
        parent = top
        if len(cmd.path) == 2:
            group = cmd.path[0]
            if group not in groups:  # a group's parser comes with its first subcommand
                groups[group] = top.add_parser(group, help=GROUP_HELP[group]).add_subparsers(
                    dest=f"{group}_command", required=True, metavar="SUBCOMMAND")
            parent = groups[group]
        sub = parent.add_parser(cmd.path[-1], help=cmd.help)
        cmd.add_arguments(sub)
        sub.set_defaults(handler=cmd.handler)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run_command(args.handler, args)


if __name__ == "__main__":
    main()
