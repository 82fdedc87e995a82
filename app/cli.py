"""The `exaforce` command line. Only this module (and job templates) read the environment.

Every bad input ends with one line `exaforce: error: <file>: frame K: ...` on stderr and a
non-zero exit; under MPI a failing rank aborts the whole job instead of leaving the others
waiting in a collective.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

EXIT_BAD_INPUT = 2


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""


def _say(message: str) -> None:
    print(message, flush=True)


def _fail(message: str, topo=None) -> None:
    print(f"exaforce: error: {message}", file=sys.stderr, flush=True)
    if topo is not None and topo.world_size > 1:
        topo.world.Abort(EXIT_BAD_INPUT)  # the other ranks may be inside a collective
    raise SystemExit(EXIT_BAD_INPUT)


def _user_errors() -> tuple[type[BaseException], ...]:
    from exaforce.config import ConfigError
    from exaforce.io.schema import DataError
    from exaforce.io.stage import StageError
    from exaforce.jobs import JobError
    from exaforce.topology import TopologyError

    return (ConfigError, DataError, JobError, StageError, TopologyError, UserError)


# ---------------------------------------------------------------- data
def cmd_data_synth(args: argparse.Namespace) -> None:
    from exaforce.io.extxyz import write_extxyz
    from exaforce.io.synth import synthesize

    if args.structures < 1:
        raise UserError(f"--structures {args.structures}: must be >= 1")
    if args.method is not None and args.source != "molecules":
        raise UserError(f"--method {args.method}: only for --source molecules (metals are labelled by EMT)")
    method = "EMT" if args.source == "metals" else args.method or "GFN2-xTB"
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done == total or done % max(total // 10, 1) == 0:
            _say(f"  labelled {done}/{total} structures with {method}")

    if args.source == "metals":
        atoms = synthesize(args.structures, args.seed, progress=progress)
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


def cmd_data_convert(args: argparse.Namespace) -> None:
    from exaforce.io.convert import Converted, convert
    from exaforce.io.schema import DataError
    from exaforce.topology import Topology

    topo = Topology.from_mpi()
    t0 = time.perf_counter()
    tag = f"rank {topo.rank}: " if topo.world_size > 1 else ""

    def log(done: Converted) -> None:
        _say(f"{tag}converted {done.n_structures} structures ({done.n_atoms} atoms, method {done.method}) "
             f"from {done.source} to {done.out} in {time.perf_counter() - t0:.1f} s")

    sources = [Path(p) for p in args.inputs]
    try:
        outcome = convert(sources, Path(args.out), args.name, args.method, args.overwrite, topo.world, log)
    except DataError as exc:  # the same refusal on every rank: one of them says it
        if topo.is_root:
            print(f"exaforce: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_INPUT) from None
    for message in outcome.failures:  # every rank reports its own
        print(f"exaforce: error: {message}", file=sys.stderr, flush=True)
    if outcome.n_failed:  # every rank knows the total, so every rank exits with the same status
        if topo.is_root and len(sources) > 1:
            print(f"exaforce: error: {outcome.n_failed} of {len(sources)} inputs failed; nothing written to "
                  f"{args.out}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_INPUT)
    if topo.is_root and len(sources) > 1:
        _say(f"wrote {len(sources)} datasets to {args.out} in {time.perf_counter() - t0:.1f} s")


def cmd_data_inspect(args: argparse.Namespace) -> None:
    import json

    from exaforce.io.summary import format_summary, summarize

    info = summarize(args.dataset)
    print(json.dumps(info) if args.json else format_summary(info), flush=True)


# ---------------------------------------------------------------- stage
def cmd_stage(args: argparse.Namespace) -> None:
    from exaforce import config as config_mod
    from exaforce.io.stage import stage_datasets
    from exaforce.topology import Topology

    topo = Topology.from_mpi()
    try:
        sources = [Path(p) for p in args.datasets]
        if args.config:
            sources += [Path(d.path) for d in config_mod.load(args.config).data.listed()]
        if not sources:
            raise config_mod.ConfigError("nothing to stage: name datasets or --config")
        log = _say if topo.local_rank == 0 else (lambda message: None)
        staged = stage_datasets(sources, Path(args.to), topo.node, log=log, fallback=args.fallback)
    except _user_errors() as exc:
        _fail(str(exc), topo)
    if topo.is_root:
        for path in staged:
            _say(f"staged: {path}")


# ---------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> None:
    """Exit status: 0 done; REQUEUE_EXIT_CODE (75) checkpointed after SIGTERM/SIGUSR1, resubmit with
    --resume; NONFINITE_EXIT_CODE (3) stopped on a non-finite step; 2 bad input; 1 a rank failed
    (every rank aborted). See exaforce.faults."""
    from exaforce import config as config_mod
    from exaforce.faults import RunStopped, StopSignals, abort_job
    from exaforce.topology import Topology
    from exaforce.train import train

    topo = None
    resume = args.resume if args.resume in (None, "latest") else str(Path(args.resume).resolve())
    with StopSignals() as signals:  # from here SIGTERM/SIGUSR1 mean: checkpoint at the next step boundary
        try:
            cfg = config_mod.load(args.config, args.set)
            overrides = {k: v for k, v in (("out_dir", args.out_dir), ("steps", args.steps), ("resume", resume),
                                           ("init_from", args.init_from), ("freeze", args.freeze)) if v is not None}
            cfg = config_mod.validate(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, **overrides)))
            topo = Topology.from_mpi(dp=cfg.parallel.dp, ep=cfg.parallel.ep)
            log: Callable[[str], None] = _say if topo.is_root else (lambda message: None)
            log(topo.table())
            run_dir = train(cfg, topo, log, signals)
        except _user_errors() as exc:
            _fail(str(exc), topo)
        except RunStopped as stop:  # every rank decided it together: a clean exit with its code, no abort
            raise SystemExit(stop.exit_code) from None
        except Exception as exc:  # perhaps on this rank alone: abort them all rather than leave them waiting
            if topo is None:
                raise
            abort_job(topo.world, exc)
    log(f"run folder: {run_dir}")


# ---------------------------------------------------------------- predict
def cmd_predict(args: argparse.Namespace) -> None:
    import json

    from exaforce.predict import ModelSource, PredictError, predict
    from exaforce.topology import Topology

    topo = None
    try:
        topo = Topology.from_mpi()
        log: Callable[[str], None] = _say if topo.is_root else (lambda message: None)
        source = ModelSource(checkpoint=args.checkpoint, preset=args.preset, seed=args.seed)
        summary = predict(source, args.data, args.out, topo, batch_size=args.batch_size, head=args.head,
                          dtype=args.dtype, overwrite=args.overwrite, log=log)
    except (*_user_errors(), PredictError) as exc:
        _fail(str(exc), topo)
    if args.json and topo.is_root:
        print(json.dumps(summary), flush=True)


# ---------------------------------------------------------------- perf
def cmd_perf_report(args: argparse.Namespace) -> None:
    from exaforce.perf.campaign import CAMPAIGN_FILE, format_campaign, summarize_campaign, write_campaign_report
    from exaforce.perf.report import format_summary, load_run, summarize, write_report

    target = Path(args.run_dir)
    out = Path(args.out) if args.out else None
    if (target / CAMPAIGN_FILE).is_file():
        summary = summarize_campaign(target)
        path = write_campaign_report(target, out, summary)
        _say(format_campaign(summary))
    else:
        summary = summarize(load_run(target))  # read the logs once
        path = write_report(target, out, summary)
        _say(format_summary(summary))
    _say(f"report: {path} (and report.html beside it)")


# ---------------------------------------------------------------- jobs
def _job_request(args: argparse.Namespace):
    from exaforce.jobs import JobRequest

    return JobRequest(config=Path(args.config), ranks_per_node=args.ranks_per_node, walltime=args.walltime,
                      account=args.account or "", partition=args.partition or "", job_name=args.job_name,
                      stage_dir=args.stage_dir or "", overrides=tuple(args.set), signal_lead_s=args.signal_lead,
                      nodes=getattr(args, "nodes", 1),
                      run_dir=Path(args.run_dir) if getattr(args, "run_dir", None) else None)


def cmd_jobs_render(args: argparse.Namespace) -> None:
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


def cmd_jobs_campaign(args: argparse.Namespace) -> None:
    from exaforce.jobs import JobError, render_campaign

    try:
        nodes = [int(n) for n in args.node_list.split(",")]
    except ValueError:
        raise JobError(f"--nodes {args.node_list!r}: a comma-separated list of node counts, e.g. 1,2,4,8") from None
    out = render_campaign(args.machine, args.mode, nodes, _job_request(args), Path(args.out), args.batch_per_rank)
    _say(f"campaign: {out} ({len(nodes)} jobs, {args.mode} scaling on {args.machine}); submit with {out}/submit.sh, "
         f"then `exaforce perf report {out}`")


# ---------------------------------------------------------------- model, bench
def cmd_model_info(args: argparse.Namespace) -> None:
    import json

    from exaforce.config import model_preset
    from exaforce.model.potential import parameter_counts

    cfg = model_preset(args.preset)
    counts = parameter_counts(cfg)  # built on the meta device: a 1e9-parameter preset costs no memory
    info = {"preset": args.preset, "params": counts["total"], "dense_params": counts["dense"],
            "expert_params": counts["expert"], "active_params_per_atom": counts["active_per_token"],
            "moe_layers": counts["moe_layers"], "experts": cfg.moe_experts, "top_k": cfg.moe_top_k,
            "width": cfg.width, "blocks": cfg.blocks, "edge_mlp_ratio": cfg.edge_mlp_ratio,
            "node_mlp_ratio": cfg.node_mlp_ratio, "cutoff": cfg.cutoff,
            "three_body_cutoff": cfg.three_body_cutoff, "elements": list(cfg.elements)}
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:>22}: {value:,}" if isinstance(value, int) else f"{key:>22}: {value}")


def cmd_bench_step(args: argparse.Namespace) -> None:
    import json

    from exaforce.bench import bench_step
    from exaforce.config import model_preset

    model_preset(args.preset)  # a bad name fails before any work
    result = bench_step(args.preset, args.batch, args.dtype, args.warmup, args.repeats, args.compare, _say)
    if args.json:
        print(json.dumps(result))


def cmd_bench_ep(args: argparse.Namespace) -> None:
    import json

    from exaforce.bench_runs import bench_ep

    try:
        result = bench_ep(args.preset, args.ranks, args.ep, args.experts, args.batch_per_rank, args.steps,
                          args.warmup, args.dtype, not args.no_baseline, _say)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print(json.dumps(result))


def cmd_bench_comm(args: argparse.Namespace) -> None:
    import json

    from exaforce.bench_runs import bench_comm

    result = bench_comm(args.preset, args.ranks, args.batch_per_rank, args.steps, args.warmup, args.dtype,
                        args.backends.split(","), _say)
    if args.json:
        print(json.dumps(result))


def cmd_bench_balance(args: argparse.Namespace) -> None:
    import json

    from exaforce.bench_runs import bench_balance

    result = bench_balance(args.structures, args.ranks, args.steps, args.warmup, _say)
    if args.json:
        print(json.dumps(result))


def cmd_bench_io(args: argparse.Namespace) -> None:
    import json

    from exaforce.bench_io import bench_io

    result = bench_io(args.structures, [int(r) for r in args.ranks.split(",")], args.repeats, _say)
    if args.json:
        print(json.dumps(result))


def cmd_bench_predict(args: argparse.Namespace) -> None:
    import json

    from exaforce.bench_predict import bench_predict
    from exaforce.config import model_preset

    model_preset(args.preset)  # a bad name fails before any work
    result = bench_predict(args.preset, args.structures, [int(r) for r in args.ranks.split(",")], args.batch_size,
                           args.repeats, args.dtype, args.compare, _say)
    if args.json:
        print(json.dumps(result))


def cmd_bench_md(args: argparse.Namespace) -> None:
    import json

    from exaforce.bench import bench_md

    result = bench_md(args.checkpoint, args.steps, args.temperature, args.dtype, _say)
    if args.json:
        print(json.dumps(result))


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exaforce", description=__doc__.splitlines()[0])
    from exaforce import __version__
    parser.add_argument("--version", action="version", version=f"exaforce {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="make, convert and inspect datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    synth = data_commands.add_parser("synth", help="labelled structures as extxyz: periodic metals (EMT) "
                                     "or molecules (GFN2-/GFN1-xTB via tblite)")
    synth.add_argument("--source", choices=("metals", "molecules"), default="metals",
                       help="metals: EMT-labelled fcc/bcc/hcp cells with stress; molecules: rattled G2 "
                            "molecules in vacuum, energy and forces from tblite (default metals)")
    synth.add_argument("--method", choices=("GFN2-xTB", "GFN1-xTB"), default=None,
                       help="tblite method for --source molecules (default GFN2-xTB)")
    synth.add_argument("--out", required=True, help="extxyz file to write")
    synth.add_argument("--structures", type=int, default=200, help="number of structures (default 200)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.set_defaults(func=cmd_data_synth)
    convert = data_commands.add_parser("convert", help="extxyz / ASE db / HDF5 → ADIOS2 BP5 dataset(s); "
                                       "several inputs are converted in parallel under mpiexec")
    convert.add_argument("inputs", nargs="+", metavar="INPUT",
                         help="labelled structures, format by suffix: .xyz/.extxyz, .db (ASE SQLite database), "
                              ".h5/.hdf5 (layout in io/SCHEMA.md)")
    convert.add_argument("--out", required=True, help="one input: the dataset directory to write (DIR.bp); "
                         "several: a folder that receives OUT/<stem>.bp for each, all or none")
    convert.add_argument("--name", required=True, help="dataset name (a fidelity/source label), given to every output")
    convert.add_argument("--method", help="level of theory of the labels, e.g. EMT, PBE, GFN2-xTB "
                         "(default: the input's own, as an HDF5 file stores it, else 'unknown')")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing dataset (or folder of "
                         "datasets) atomically")
    convert.set_defaults(func=cmd_data_convert)
    inspect = data_commands.add_parser("inspect", help="counts, elements, method, schema version, label "
                                       "statistics and attributes of a BP5 dataset")
    inspect.add_argument("dataset", help="dataset directory (DIR.bp)")
    inspect.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    inspect.set_defaults(func=cmd_data_inspect)

    stage = commands.add_parser("stage", help="copy datasets to node-local storage (node leaders copy, all verify)")
    stage.add_argument("datasets", nargs="*", help="datasets (DIR.bp) or files to stage")
    stage.add_argument("--config", help="also stage every dataset of this run config (train with --set data.stage_dir=DIR)")
    stage.add_argument("--to", required=True, help="node-local folder, e.g. /mnt/bb/$USER or $TMPDIR")
    stage.add_argument("--fallback", action="store_true",
                       help="when staging fails (no space, no permission), warn and use the sources in place")
    stage.set_defaults(func=cmd_stage)

    train = commands.add_parser("train", help="train a potential (run under mpiexec -n N)")
    train.add_argument("--config", required=True, help="TOML run configuration")
    train.add_argument("--out-dir", help="override run.out_dir")
    train.add_argument("--steps", type=int, help="override run.steps")
    train.add_argument("--resume", nargs="?", const="latest", metavar="latest|PATH",
                       help="override run.resume: continue from the run folder's newest complete checkpoint "
                            "(latest, the default; a new run when there is none) or from checkpoint folder PATH")
    train.add_argument("--init-from", metavar="CHECKPOINT", help="override run.init_from: fine-tune from this "
                       "checkpoint (file or run folder); heads missing from it start as the mean of its heads")
    train.add_argument("--freeze", choices=("none", "backbone"), help="override run.freeze: with --init-from, "
                       "train everything (none) or only the readout and head embeddings (backbone)")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value (TOML syntax), repeatable: --set data.global_batch_size=64")
    train.set_defaults(func=cmd_train)

    pred = commands.add_parser("predict", help="energies, forces and stress of every structure of a BP5 dataset "
                               "(run under mpiexec -n N), written as a BP5 dataset; throughput reported")
    which = pred.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="trained checkpoint (file, or a run folder: its latest)")
    which.add_argument("--preset", help="a model preset with seeded random weights (benchmarks)")
    pred.add_argument("--seed", type=int, default=0, help="seed of --preset's random weights (default 0)")
    pred.add_argument("--data", required=True, help="input dataset (DIR.bp)")
    pred.add_argument("--out", required=True, help="output dataset (DIR.bp): the input's structures, predicted labels")
    pred.add_argument("--head", help="energy head (dataset/fidelity) to predict with (default: the model's first)")
    pred.add_argument("--batch-size", type=int, default=16, help="structures per batch (default 16); the numbers "
                      "depend on it, never on the number of ranks")
    pred.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    pred.add_argument("--overwrite", action="store_true", help="replace an existing --out atomically")
    pred.add_argument("--json", action="store_true", help="last line: one JSON object (counts, seconds, throughput)")
    pred.set_defaults(func=cmd_predict)

    perf = commands.add_parser("perf", help="performance reports from per-rank perf logs")
    perf_commands = perf.add_subparsers(dest="perf_command", required=True, metavar="SUBCOMMAND")
    report = perf_commands.add_parser("report", help="Markdown + HTML report with plots (PNG, SVG) of a run, or of a "
                                      "scaling campaign (speed-up, efficiency, EFLOPS, full-machine projection)")
    report.add_argument("run_dir", metavar="RUN_OR_CAMPAIGN_DIR",
                        help="run folder (holds perf/rank-*.jsonl) or campaign folder (holds campaign.json)")
    report.add_argument("--out", help="report folder (default RUN_OR_CAMPAIGN_DIR/report)")
    report.set_defaults(func=cmd_perf_report)
    jobs = commands.add_parser("jobs", help="job scripts for Frontier, Aurora, Perlmutter, any Slurm, this host; "
                               "scaling campaigns")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True, metavar="SUBCOMMAND")
    render = jobs_commands.add_parser("render", help="one ready job script (sbatch, PBS or bash)")
    campaign = jobs_commands.add_parser("campaign", help="one job per point of a strong- or weak-scaling campaign, "
                                        "a manifest and a submit script")
    for sub in (render, campaign):
        sub.add_argument("--machine", required=True, choices=("frontier", "aurora", "perlmutter", "slurm", "local"))
        sub.add_argument("--config", required=True, help="TOML run configuration")
        sub.add_argument("--account", help="allocation to charge (Frontier, Aurora, Perlmutter)")
        sub.add_argument("--partition", help="partition (Slurm), QOS (Perlmutter) or queue (PBS)")
        sub.add_argument("--walltime", default="01:00:00", help="HH:MM:SS (default 01:00:00)")
        sub.add_argument("--ranks-per-node", type=int, help="slurm and local only (one rank per GPU elsewhere)")
        sub.add_argument("--job-name", default="exaforce")
        sub.add_argument("--stage-dir", help="node-local dataset copies (default: the machine's NVMe or /tmp)")
        sub.add_argument("--signal-lead", type=int, default=120,
                         help="seconds before the walltime at which the job checkpoints and requeues (default 120)")
        sub.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="config override passed to `exaforce train`, repeatable")
    render.add_argument("--nodes", type=int, default=1)
    render.add_argument("--run-dir", help="run folder (default: the config's run.out_dir)")
    render.add_argument("--out", help="write the script here (default: standard output)")
    render.set_defaults(func=cmd_jobs_render)
    campaign.add_argument("--mode", required=True, choices=("strong", "weak"),
                          help="strong: fixed global batch; weak: fixed batch per rank")
    campaign.add_argument("--nodes", dest="node_list", required=True,
                          help="node counts, e.g. 1,2,4,8 (local: groups of --ranks-per-node ranks on this host)")
    campaign.add_argument("--batch-per-rank", type=int, help="weak mode (default: global batch / smallest point's ranks)")
    campaign.add_argument("--out", required=True, help="campaign folder to create")
    campaign.set_defaults(func=cmd_jobs_campaign)
    model = commands.add_parser("model", help="model presets and sizes")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")
    info = model_commands.add_parser("info", help="parameter count and shape of a preset")
    info.add_argument("--preset", required=True, help="small | demo | small-moe | base | moe-100m | moe-1b")
    info.add_argument("--json", action="store_true", help="one JSON object")
    info.set_defaults(func=cmd_model_info)

    bench = commands.add_parser("bench", help="benchmarks")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True, metavar="SUBCOMMAND")
    step = bench_commands.add_parser("step", help="median full training step (forward, forces/stress with "
                                                  "create_graph, loss, backward, optimizer) after warm-up")
    step.add_argument("--preset", default="base", help="model preset (default base)")
    step.add_argument("--batch", type=int, default=4, help="structures per step from `data synth` seed 0 (default 4)")
    step.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    step.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    step.add_argument("--repeats", type=int, default=10, help="timed steps; the median is reported (default 10)")
    step.add_argument("--compare", choices=["matris"], help="measure the reference model the same way")
    step.add_argument("--json", action="store_true", help="last line: one JSON object")
    step.set_defaults(func=cmd_bench_step)
    ep = bench_commands.add_parser("ep", help="expert parallel (dp=R/ep, ep) against data parallel (dp=R, ep=1) "
                                   "at the same per-rank batch: step time, all-to-all and reduction shares")
    ep.add_argument("--preset", default="small-moe", help="MoE model preset (default small-moe)")
    ep.add_argument("--experts", type=int, help="override the preset's experts per MoE layer")
    ep.add_argument("--ranks", type=int, default=2, help="MPI ranks of both runs (default 2)")
    ep.add_argument("--ep", type=int, default=2, help="expert-parallel degree of the second run (default 2)")
    ep.add_argument("--batch-per-rank", type=int, default=2, help="structures per rank per step (default 2)")
    ep.add_argument("--steps", type=int, default=12, help="training steps per run (default 12)")
    ep.add_argument("--warmup", type=int, default=2, help="steps left out of the median (default 2)")
    ep.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ep.add_argument("--no-baseline", action="store_true", help="skip the ep=1 run (a model too big for one rank)")
    ep.add_argument("--json", action="store_true", help="last line: one JSON object")
    ep.set_defaults(func=cmd_bench_ep)

    comm = bench_commands.add_parser("comm", help="gradient-reduction time per step for each backend, with the "
                                     "reduction overlapping the backward and after it")
    comm.add_argument("--preset", default="base", help="model preset (default base)")
    comm.add_argument("--ranks", type=int, default=2, help="data-parallel ranks (default 2)")
    comm.add_argument("--backends", default="mpi,horovod,torch", help="comma-separated (default mpi,horovod,torch)")
    comm.add_argument("--batch-per-rank", type=int, default=2, help="structures per rank per step (default 2)")
    comm.add_argument("--steps", type=int, default=10, help="training steps per run (default 10)")
    comm.add_argument("--warmup", type=int, default=2, help="steps left out of the median (default 2)")
    comm.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    comm.add_argument("--json", action="store_true", help="last line: one JSON object")
    comm.set_defaults(func=cmd_bench_comm)

    balance = bench_commands.add_parser("balance", help="per-rank cost and time imbalance on the demo's "
                                        "multi-fidelity data: cost-balanced deal against round-robin")
    balance.add_argument("--structures", type=int, default=200, help="metals and GFN2 molecules each; GFN1: half")
    balance.add_argument("--ranks", type=int, default=2, help="MPI ranks (default 2)")
    balance.add_argument("--steps", type=int, default=30, help="training steps per run (default 30)")
    balance.add_argument("--warmup", type=int, default=3, help="steps left out of the medians (default 3)")
    balance.add_argument("--json", action="store_true", help="last line: one JSON object")
    balance.set_defaults(func=cmd_bench_balance)

    bio = bench_commands.add_parser("io", help="reader throughput (BP5, HDF5 via h5py, extxyz via ASE) on 1 and 2 "
                                    "ranks, and staging bandwidth against cp")
    bio.add_argument("--structures", type=int, default=2000, help="EMT structures from data synth (default 2000)")
    bio.add_argument("--ranks", default="1,2", help="comma-separated rank counts (default 1,2)")
    bio.add_argument("--repeats", type=int, default=5, help="repeats; medians are reported (default 5)")
    bio.add_argument("--json", action="store_true", help="last line: one JSON object")
    bio.set_defaults(func=cmd_bench_io)

    bpred = bench_commands.add_parser("predict", help="`exaforce predict` throughput on 1, 2, … ranks (EMT structures "
                                      "from data synth), optionally beside the MatRIS reference model's inference")
    bpred.add_argument("--preset", default="base", help="model preset, random weights (default base)")
    bpred.add_argument("--structures", type=int, default=200, help="EMT structures, synth seed 0 (default 200)")
    bpred.add_argument("--ranks", default="1,2", help="comma-separated rank counts (default 1,2)")
    bpred.add_argument("--batch-size", type=int, default=16, help="structures per batch (default 16)")
    bpred.add_argument("--repeats", type=int, default=3, help="runs per rank count; medians are reported (default 3)")
    bpred.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    bpred.add_argument("--compare", choices=["matris"], help="also time the reference model on the same structures")
    bpred.add_argument("--json", action="store_true", help="last line: one JSON object")
    bpred.set_defaults(func=cmd_bench_predict)

    md = bench_commands.add_parser("md", help="NVE energy drift: 108-atom Cu, 1 fs steps, through the ASE calculator")
    md.add_argument("--checkpoint", required=True, help="trained checkpoint (e.g. demo/run/checkpoints/…)")
    md.add_argument("--steps", type=int, default=1000, help="1 fs steps (default 1000 = 1 ps)")
    md.add_argument("--temperature", type=float, default=300.0, help="initial Maxwell-Boltzmann temperature, K")
    md.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    md.add_argument("--json", action="store_true", help="last line: one JSON object")
    md.set_defaults(func=cmd_bench_md)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except _user_errors() as exc:
        _fail(str(exc))


if __name__ == "__main__":
    main()
