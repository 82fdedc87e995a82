"""Job scripts and scaling campaigns: one rendered script per machine, one job per campaign point.

    render_job(machine, JobRequest) -> str          a ready sbatch / PBS / bash script
    render_campaign(machine, mode, nodes, …) -> Path  jobs + campaign.json + submit.sh

Machine facts (ranks and GPUs per node, binding, node-local storage, scheduler) live in JOB_MACHINES;
the per-rank device peaks and system sizes in perf/machines.py. Every job writes its perf logs
under its run folder, which `exaforce perf report` reads back (a campaign folder as a whole).
A job that receives the scheduler's warning signal checkpoints, exits REQUEUE_EXIT_CODE and
requeues itself; the next run resumes from the newest checkpoint.

The templates and each HPC machine's envs/<machine>/env.sh are data of the `exaforce.jobscripts`
package, so a pip-installed exaforce renders the same jobs as a checkout. A job runs the Python
environment that rendered it: local and slurm put its bin folder on PATH, the HPC jobs source the
shipped env.sh (modules, network variables) with EXAFORCE_VENV set to it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from exaforce import config as config_mod
from exaforce.faults import REQUEUE_EXIT_CODE
from exaforce.perf.campaign import CAMPAIGN_FILE, CAMPAIGN_SCHEMA, MODES
from exaforce.perf.machines import MACHINES

JOBSCRIPTS = resources.files("exaforce.jobscripts")

AURORA_CPU_BIND = "1-8:9-16:17-24:25-32:33-40:41-48:53-60:61-68:69-76:77-84:85-92:93-100"


class JobError(ValueError):
    """A job request that cannot be rendered; the message names the option."""


@dataclass(frozen=True, slots=True)
class JobMachine:
    name: str
    template: str
    scheduler: str                  # slurm | pbs | local
    ranks_per_node: int | None      # None: given by --ranks-per-node
    cores_per_node: int | None
    stage_dir: str                  # node-local storage, shell-expanded at run time
    env_lines: tuple[str, ...]
    env_note: str
    needs_account: bool
    default_partition: str = ""
    scale_unit: str = "nodes"
    device: str = "auto"            # run.device the job trains on (unless the config names one); the launch
                                    # line binds each rank to its own device (exaforce.device takes index 0)


def _env(machine: str) -> tuple[str, ...]:
    """Sources the machine's env.sh (modules, network variables, then the venv's activate). From a
    checkout (jobscripts/envs links to the repository's envs/) it is the repository's file with its
    own venv default (envs/<machine>/setup.sh builds it); from an installed wheel it is the shipped
    copy, whose relative default means nothing there, so EXAFORCE_VENV defaults to the environment
    rendering this job."""
    envs = JOBSCRIPTS / "envs"
    in_checkout = Path(str(envs)).is_symlink()
    env_sh = Path(str(envs / machine / "env.sh")).resolve()
    venv = () if in_checkout else (f'export EXAFORCE_VENV="${{EXAFORCE_VENV:-{shlex.quote(sys.prefix)}}}"',)
    # SC1091: the file is shellchecked on its own (its modules exist only on that machine).
    return (*venv, "# shellcheck disable=SC1091", f"source {shlex.quote(str(env_sh))}")


def _interpreter_path() -> tuple[str, ...]:
    """The bin folder of the interpreter rendering this job (its exaforce and mpiexec) on PATH."""
    return (f'export PATH={shlex.quote(str(Path(sys.executable).parent))}:"$PATH"',)


RENDERING_ENV = f"the Python environment that rendered this job ({sys.prefix})"
JOB_MACHINES: dict[str, JobMachine] = {
    "frontier": JobMachine("frontier", "frontier.sbatch.j2", "slurm", MACHINES["frontier"].ranks_per_node, 56,
                           '"/mnt/bb/$USER/exaforce-stage"', _env("frontier"),
                           "envs/frontier/env.sh (ROCm, Cray MPICH, RCCL over libfabric)", True, "batch",
                           device="cuda"),
    "perlmutter": JobMachine("perlmutter", "perlmutter.sbatch.j2", "slurm", MACHINES["perlmutter"].ranks_per_node,
                             64, '"/tmp/$USER/exaforce-stage"', _env("perlmutter"),
                             "envs/perlmutter/env.sh (CUDA, Cray MPICH, NCCL)", True, "regular",
                             device="cuda"),
    "aurora": JobMachine("aurora", "aurora.pbs.j2", "pbs", MACHINES["aurora"].ranks_per_node, 104,
                         '"/tmp/$USER/exaforce-stage"', _env("aurora"),
                         "envs/aurora/env.sh (frameworks module: XPU PyTorch, oneCCL)", True, "prod",
                         device="xpu"),
    "slurm": JobMachine("slurm", "slurm.sbatch.j2", "slurm", None, None,
                        '"${TMPDIR:-/tmp}/$USER/exaforce-stage"', _interpreter_path(), RENDERING_ENV, False),
    "local": JobMachine("local", "local.sh.j2", "local", None, None,
                        '"${TMPDIR:-/tmp}/$USER/exaforce-stage"', _interpreter_path(), RENDERING_ENV, False,
                        scale_unit="ranks"),
}


@dataclass(frozen=True, slots=True)
class JobRequest:
    config: Path
    nodes: int = 1
    ranks_per_node: int | None = None   # slurm / local only (fixed by the hardware elsewhere)
    walltime: str = "01:00:00"
    account: str = ""
    partition: str = ""
    job_name: str = "exaforce"
    run_dir: Path | None = None         # default: the config's run.out_dir
    stage_dir: str = ""                 # default: the machine's node-local storage
    overrides: tuple[str, ...] = ()     # --set SECTION.KEY=VALUE for `exaforce train`
    signal_lead_s: int = 120            # warning signal this long before the walltime
    filesystems: str = "home:flare"     # PBS -l filesystems (Aurora)


# Values that land on #SBATCH / #PBS directive lines, which the scheduler reads without a shell and
# which cannot be quoted: each must match what it can legitimately hold (a newline would start a
# shell command of the script). Values in the script body are shell-quoted instead (the `q` filter).
NAME = re.compile(r"[A-Za-z0-9_.-]+")                   # account, partition / QOS / queue, job name
FILESYSTEMS = re.compile(r"[A-Za-z0-9_]+(?::[A-Za-z0-9_]+)*")  # PBS -l filesystems=home:flare
DIRECTIVE_PATH = re.compile(r"[A-Za-z0-9_./+,=@%~-]+")  # the job log under the run folder


def _directive_value(option: str, value: str, pattern: re.Pattern[str], allowed: str) -> str:
    if not pattern.fullmatch(value):
        raise JobError(f"{option} {value!r}: {allowed} only (the value goes on a scheduler directive line, "
                       f"which cannot be quoted)")
    return value


def _check_directive_values(request: JobRequest, run_dir: Path) -> None:
    letters = "letters, digits, '.', '_' and '-'"
    _directive_value("--job-name", request.job_name, NAME, letters)
    for option, value in (("--account", request.account), ("--partition", request.partition)):
        if value:
            _directive_value(option, value, NAME, letters)
    _directive_value("filesystems", request.filesystems, FILESYSTEMS, "names of letters, digits and '_' joined by ':'")
    _directive_value("--run-dir (or the config's run.out_dir)", str(run_dir), DIRECTIVE_PATH,
                     "letters, digits and ./_+,=@%~- (no spaces, quotes or newlines)")


def walltime_seconds(walltime: str) -> int:
    match = re.fullmatch(r"(?:([0-9]+)-)?([0-9]+):([0-9][0-9]):([0-9][0-9])", walltime)
    if not match:
        raise JobError(f"--walltime {walltime!r}: expected HH:MM:SS or D-HH:MM:SS")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def ranks_per_node(machine: JobMachine, request: JobRequest) -> int:
    if machine.ranks_per_node is not None:
        if request.ranks_per_node not in (None, machine.ranks_per_node):
            raise JobError(f"--ranks-per-node {request.ranks_per_node}: {machine.name} runs one rank per device, "
                           f"{machine.ranks_per_node} per node")
        return machine.ranks_per_node
    return request.ranks_per_node or 1


def _launch_lines(machine: JobMachine, ranks: int, rpn: int) -> tuple[str, str, int]:
    """(staging launcher, training launcher, OpenMP threads per rank)."""
    if machine.name == "frontier":
        return ('srun -N"$N" -n"$N" --ntasks-per-node=1 -c7',
                'srun -N"$N" -n$((N*8)) -c7 --gpus-per-task=1 --gpu-bind=closest --kill-on-bad-exit=1', 7)
    if machine.name == "perlmutter":
        return ('srun -N"$N" -n"$N" --ntasks-per-node=1 -c32',
                'srun -N"$N" -n$((N*4)) --ntasks-per-node=4 -c32 --cpu-bind=cores --gpus-per-task=1 --kill-on-bad-exit=1', 16)
    if machine.name == "aurora":
        return ('mpiexec -n "$N" --ppn 1',
                f'mpiexec -n $((N*12)) --ppn 12 --cpu-bind list:{AURORA_CPU_BIND} "$RUN_DIR/tile-bind.sh"', 8)
    return f'mpiexec -n {ranks} -ppn {rpn}', f'mpiexec -n {ranks} -ppn {rpn}', 1


def _template(name: str) -> str | None:
    """A template of the exaforce.jobscripts package (None: jinja2 raises TemplateNotFound)."""
    path = JOBSCRIPTS / name
    return path.read_text(encoding="utf-8") if path.is_file() else None


def render_job(machine_name: str, request: JobRequest) -> str:
    """The job script for one run: environment, staging, training with requeue on the warning signal."""
    import jinja2

    machine = JOB_MACHINES.get(machine_name)
    if machine is None:
        raise JobError(f"--machine {machine_name!r}: known machines are {sorted(JOB_MACHINES)}")
    if request.nodes < 1:
        raise JobError(f"--nodes {request.nodes}: must be >= 1")
    if machine.scheduler == "local" and request.nodes != 1:
        raise JobError(f"--nodes {request.nodes}: the local machine is one host (use --ranks-per-node)")
    if machine.needs_account and not request.account:
        raise JobError(f"--account is required on {machine.name} (the allocation to charge)")
    lead = request.signal_lead_s
    seconds = walltime_seconds(request.walltime)
    if machine.scheduler != "local" and not 0 < lead < seconds:
        raise JobError(f"--signal-lead {lead}: must be between 0 and the walltime ({seconds} s)")
    cfg = config_mod.load(request.config, request.overrides)  # a bad config fails here, not in the queue
    rpn = ranks_per_node(machine, request)
    ranks = request.nodes * rpn
    if ranks % cfg.parallel.ep:
        raise JobError(f"{ranks} ranks: not divisible by parallel.ep = {cfg.parallel.ep} of {request.config}")
    run_dir = Path(request.run_dir or cfg.run.out_dir).resolve()
    _check_directive_values(request, run_dir)
    stage_launch, train_launch, threads = _launch_lines(machine, ranks, rpn)
    env_lines = list(machine.env_lines)
    if machine.name == "aurora":  # one stack per rank: ZE_AFFINITY_MASK from PALS's local rank (FLAT mode)
        env_lines += ["# shellcheck disable=SC2016  # expanded by the wrapper at each rank's start",
                      "printf '#!/bin/bash\\nexport ZE_AFFINITY_MASK=\"$PALS_LOCAL_RANKID\"\\nexec \"$@\"\\n' "
                      '> "$RUN_DIR/tile-bind.sh"', 'chmod +x "$RUN_DIR/tile-bind.sh"']
    requeue = {"slurm": 'scontrol requeue "$SLURM_JOB_ID"', "pbs": 'qrerun "$PBS_JOBID"',
               "local": 'echo "run this script again to resume"'}[machine.scheduler]
    signal_note = {"slurm": f"Slurm sends SIGUSR1 {lead} s before the walltime (--signal), the trap forwards it",
                   "pbs": "a timer sends SIGUSR1 before the walltime, the trap forwards it",
                   "local": "SIGUSR1/SIGTERM to this script is forwarded to the ranks"}[machine.scheduler]
    env = jinja2.Environment(loader=jinja2.FunctionLoader(_template), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["q"] = lambda value: shlex.quote(str(value))
    return env.get_template(machine.template).render(
        job_name=request.job_name, nodes=request.nodes, ranks=ranks, ranks_per_node=rpn, dp=ranks // cfg.parallel.ep,
        walltime=request.walltime, account=request.account, partition=request.partition or machine.default_partition,
        filesystems=request.filesystems, log_file=str(run_dir / "job-%j.out" if machine.scheduler == "slurm"
                                                      else run_dir / "job.out"),
        signal_lead_s=lead, signal_timer_s=seconds - lead if machine.scheduler == "pbs" else 0,
        scheduler_name=machine.scheduler.upper(), run_dir=run_dir,
        stage_dir=request.stage_dir and shlex.quote(request.stage_dir) or machine.stage_dir,
        config=Path(request.config).resolve(), overrides=request.overrides, env_lines=env_lines,
        env_note=machine.env_note, threads_per_rank=threads, stage_launch=stage_launch, train_launch=train_launch,
        requeue=requeue, requeue_code=REQUEUE_EXIT_CODE, signal_note=signal_note,
        device=cfg.run.device if cfg.run.device != "auto" else machine.device)


# --------------------------------------------------------------------------------------------
# Campaigns


def campaign_batches(mode: str, global_batch: int, ranks: list[int], batch_per_rank: int | None) -> list[int]:
    """Global batch of each point: fixed (strong), or per-rank batch × ranks (weak; the per-rank batch
    defaults to the config's global batch over the smallest point's ranks)."""
    if mode == "strong":
        if global_batch < max(ranks):
            raise JobError(f"strong scaling keeps data.global_batch_size = {global_batch}, fewer structures than "
                           f"the largest point's {max(ranks)} ranks")
        return [global_batch] * len(ranks)
    if batch_per_rank is None:
        if global_batch % min(ranks):
            raise JobError(f"weak scaling: data.global_batch_size = {global_batch} does not split evenly over the "
                           f"smallest point's {min(ranks)} ranks; give --batch-per-rank")
        batch_per_rank = global_batch // min(ranks)
    if batch_per_rank < 1:
        raise JobError(f"--batch-per-rank {batch_per_rank}: must be >= 1")
    return [batch_per_rank * r for r in ranks]


def render_campaign(machine_name: str, mode: str, nodes: list[int], request: JobRequest, out_dir: Path,
                    batch_per_rank: int | None = None) -> Path:
    """One job per point under OUT/points/NAME/, OUT/campaign.json and OUT/submit.sh."""
    if mode not in MODES:
        raise JobError(f"--mode {mode!r}: must be one of {MODES}")
    if not nodes or any(n < 1 for n in nodes) or len(set(nodes)) != len(nodes):
        raise JobError(f"--nodes {nodes}: distinct positive node counts, e.g. 1,2,4,8")
    machine = JOB_MACHINES.get(machine_name)
    if machine is None:
        raise JobError(f"--machine {machine_name!r}: known machines are {sorted(JOB_MACHINES)}")
    out_dir = Path(out_dir).resolve()
    if (out_dir / CAMPAIGN_FILE).exists():
        raise JobError(f"{out_dir} already holds a campaign ({CAMPAIGN_FILE}); choose a new --out")
    nodes = sorted(nodes)
    rpn = ranks_per_node(machine, request)
    local = machine.scheduler == "local"  # one host: a point's "nodes" are groups of rpn ranks
    ranks = [n * rpn for n in nodes]
    cfg = config_mod.load(request.config, request.overrides)
    batches = campaign_batches(mode, cfg.data.global_batch_size, ranks, batch_per_rank)

    points = []
    for n, r, batch in zip(nodes, ranks, batches):
        name = f"r{r:05d}" if local else f"n{n:05d}"
        point = dataclasses.replace(
            request, nodes=1 if local else n, ranks_per_node=r if local else request.ranks_per_node,
            job_name=f"{request.job_name}-{mode}-{name}", overrides=(*request.overrides, f"data.global_batch_size={batch}"))
        points.append({"name": name, "nodes": n, "ranks": r, "global_batch": batch,
                       **write_job(machine_name, point, out_dir / "points" / name, out_dir)})
    manifest = {"schema": CAMPAIGN_SCHEMA, "machine": machine.name, "mode": mode, "scale_unit": machine.scale_unit,
                "ranks_per_node": rpn, "config": str(Path(request.config).resolve()),
                "overrides": list(request.overrides), "points": points}
    write_manifest_and_submit(out_dir, CAMPAIGN_FILE, manifest, machine.scheduler, [p["job"] for p in points])
    return out_dir


def write_job(machine_name: str, request: JobRequest, job_dir: Path, out_dir: Path) -> dict[str, str]:
    """One job of a campaign or search: JOB_DIR/job.<sbatch|pbs|sh> (executable) running into
    JOB_DIR/run, made now (the scheduler opens the job's output file there); both paths relative to out_dir."""
    suffix = {"slurm": "sbatch", "pbs": "pbs", "local": "sh"}[JOB_MACHINES[machine_name].scheduler]
    script = render_job(machine_name, dataclasses.replace(request, run_dir=job_dir / "run"))
    (job_dir / "run").mkdir(parents=True, exist_ok=True)
    path = job_dir / f"job.{suffix}"
    path.write_text(script, encoding="utf-8")
    path.chmod(0o755)
    return {"run_dir": str((job_dir / "run").relative_to(out_dir)), "job": str(path.relative_to(out_dir))}


def write_manifest_and_submit(out_dir: Path, manifest_file: str, manifest: dict, scheduler: str,
                              jobs: list[str]) -> None:
    """OUT/<manifest_file> and OUT/submit.sh, which submits `jobs` (paths relative to OUT) in order."""
    (out_dir / manifest_file).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    submit = out_dir / "submit.sh"
    submit.write_text(submit_script(scheduler, [Path(j) for j in jobs]), encoding="utf-8")
    submit.chmod(0o755)


def submit_script(scheduler: str, scripts: list[Path]) -> str:
    run = {"slurm": 'sbatch --parsable "$job" >> submitted.txt',
           "pbs": 'qsub "$job" >> submitted.txt',
           "local": 'bash "$job"'}[scheduler]
    jobs = " ".join(shlex.quote(str(s)) for s in scripts)
    after = ("then: exaforce perf report \"$here\" once the jobs have finished" if scheduler != "local"
             else "done; the report: exaforce perf report \"$here\"")
    return ("#!/bin/bash\n# Submits every point of this campaign (job ids go to submitted.txt).\n"
            "set -euo pipefail\nhere=\"$(cd \"$(dirname \"${BASH_SOURCE[0]}\")\" && pwd)\"\ncd \"$here\"\n"
            f"for job in {jobs}; do\n  echo \"submitting $job\"\n  {run}\ndone\necho \"{after}\"\n")
