"""A real single-host Slurm cluster for integration tests: munged, slurmctld and slurmd as root, torn down by pid.

Nothing is mocked: Debian's `slurm-wlm` 22.05 daemons run from a private temporary folder (munge key,
socket, `slurm.conf`, state, spool, logs), on ports picked free at start-up so concurrent runs do not
clash. Clients (`sbatch`, `squeue`, `scontrol`, `scancel`) find the cluster through `SLURM_CONF`; there
is no accounting database, so job states come from `scontrol show job` (and `jobcomp/filetxt`).

    from slurm_cluster import running_cluster              # tests/ is on sys.path, as for conftest

    def test_job(tmp_path):
        with running_cluster() as cluster:                 # skips the test, with the reason, if Slurm cannot run here
            job_id = cluster.sbatch(tmp_path / "job.sh", "arg", cwd=tmp_path,
                                    env={"PATH": f"{VENV_BIN}:/usr/bin:/bin"})
            assert cluster.wait(job_id, timeout_s=120) == "COMPLETED", cluster.log_tails()
            assert cluster.job_info(job_id)["ExitCode"] == "0:0"
        # here munged, slurmctld, slurmd and every process of our jobs are gone

API (all of it):
    slurm_unavailable_reason() -> str | None     why this machine cannot run the cluster (binaries, root), or None
    running_cluster(**kw)                         context manager: SlurmCluster started, or pytest.skip(reason)
    SlurmCluster(*, startup_timeout_s=60.0)       context manager; `start()` / `stop()` for explicit use
        .env() -> dict[str, str]                  SLURM_CONF: what any Slurm client needs
        .sbatch(script, *args, cwd, env=None, options=()) -> int
                                                  `sbatch --parsable [options] script args`; env is added to
                                                  os.environ (sbatch exports it to the job); the job's output is
                                                  cwd/slurm-<id>.out unless options name --output
        .wait(job_id, timeout_s=120.0) -> str     final state: COMPLETED, FAILED, TIMEOUT, CANCELLED, …; on timeout
                                                  scancels and raises TimeoutError with the daemons' log tails
        .job_info(job_id) -> dict[str, str]       `scontrol show job -o` fields (JobState, ExitCode "3:0", StdOut…)
        .log_tails(lines=30) -> str               the last lines of each daemon's log, for assertion messages
        .pids -> dict[str, int]                   {"munged": …, "slurmctld": …, "slurmd": …} while running
        .node, .partition                         the node name (`hostname -s`) and the partition ("debug")
        .root -> Path | None                      the temporary folder (slurm.conf, jobcomp.txt, *.out logs)
    SlurmStartError(RuntimeError)                 start-up failed; the message carries the log tails
    pid_alive(pid) -> bool                        the process exists and is not a zombie (for leak checks)

`stop()` (also run by `__exit__` on error) cancels our jobs, then sends SIGTERM to slurmctld, slurmd and
munged by pid, SIGKILL after 5 s, kills any left process whose environment carries our
`SLURM_CONF` (job steps and their children), and removes the temporary folder. The daemons also get
SIGTERM if the test process itself dies (PR_SET_PDEATHSIG).

Jobs: the node has CPUs = this process's CPU count, so `--ntasks=2` fits a 2-core machine. `sbatch` exports
the caller's environment plus `env` (pass PATH with the venv's bin; `sacct` does not work: no database).
Inside a job, launch ranks with the venv's `mpiexec -n K` (mpich's hydra, which detects the allocation);
`srun` gives no PMI here (MpiDefault=none). Ranks sharing one output file interleave mid-line when
unbuffered (PYTHONUNBUFFERED=1): leave Python's stdout buffered, or give each rank its own file.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun", "munge", "unmunge")
FINAL_STATES = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE"}
# Debian installs the daemons in /usr/sbin, which a non-login PATH may lack.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
INSTALL_HINT = "run `bash envs/local/install-slurm.sh` (or `make slurm`) as root"


class SlurmStartError(RuntimeError):
    """The cluster did not come up; the message says why and carries the daemons' log tails."""


def _which(name: str) -> str | None:
    return shutil.which(name, path=SEARCH_PATH)


def slurm_unavailable_reason() -> str | None:
    """Why a cluster cannot be brought up on this machine (for a skip message), or None when it can."""
    missing = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    if missing:
        return f"Slurm/munge binaries missing: {', '.join(missing)}; {INSTALL_HINT}"
    if os.geteuid() != 0:
        return f"the single-host Slurm cluster runs its daemons as root; this is uid {os.geteuid()}"
    return None


@contextlib.contextmanager
def running_cluster(**kwargs) -> Iterator[SlurmCluster]:
    """A started `SlurmCluster`, or `pytest.skip` with a specific reason when this machine cannot run one."""
    import pytest

    reason = slurm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(**kwargs)
    try:
        cluster.start()
    except SlurmStartError as err:  # start() has stopped what it started
        pytest.skip(f"Slurm cluster did not start: {err}")
    with cluster:
        yield cluster


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports, chosen by the kernel (bound together, so they differ; released before use)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _real_memory_mb(margin_mb: int = 512) -> int:
    """MemTotal from /proc/meminfo in MB, less a margin: slurmd drains a node that reports less than configured."""
    kib = int(re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M).group(1))
    return max(kib // 1024 - margin_mb, 256)


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM to the daemon when the test process dies, even by SIGKILL, so none outlives a run."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as err:
        return f"<{err.strerror}>"


def pid_alive(pid: int) -> bool:
    """True while /proc has the process and it is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class SlurmCluster:
    """munged + slurmctld + slurmd on this host, one partition `debug` holding this node. See the module docstring."""

    partition = "debug"

    def __init__(self, *, startup_timeout_s: float = 60.0) -> None:
        self.startup_timeout_s = startup_timeout_s
        self.node = socket.gethostname().split(".")[0]
        self.root: Path | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, Path] = {}
        self._sock: Path | None = None  # munged's socket, named in slurm.conf's AuthInfo

    # --- lifecycle -------------------------------------------------------------------------------------------
    def __enter__(self) -> SlurmCluster:
        if not self._procs:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Writes the key and config under a fresh temporary folder, starts the daemons, waits for an idle node."""
        reason = slurm_unavailable_reason()
        if reason:
            raise SlurmStartError(reason)
        # A short path under /tmp, not pytest's tmp_path: unix socket paths (munge's, slurmd's) end at 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="exaforce-slurm-"))
        self.root.chmod(0o755)  # munged wants its socket folder searchable by all (the key itself is 0400)
        try:
            self._start_munged()
            self._write_slurm_conf()
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i"])
            self._spawn("slurmd", [_which("slurmd"), "-D", "-N", self.node])
            self._wait_node_idle()
        except BaseException:
            self.stop()  # the error message carries the log tails
            raise

    def stop(self) -> None:
        """Cancels our jobs, then SIGTERM → (5 s) → SIGKILL to slurmctld, slurmd, munged by pid; idempotent."""
        if self._procs.get("slurmctld") and self._procs["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                self._cancel_all_jobs(timeout_s=5)
        # slurmctld first: stopped after slurmd, it sometimes spends seconds retrying RPCs to the gone slurmd.
        for name in ("slurmctld", "slurmd", "munged"):
            proc = self._procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self._kill_job_leftovers()
        self._procs.clear()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    @property
    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self._procs.items()}

    # --- clients ---------------------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """The variables a Slurm client needs to reach this cluster."""
        if self.root is None:
            raise RuntimeError("SlurmCluster not started")
        return {"SLURM_CONF": str(self.root / "slurm.conf")}

    def sbatch(self, script: str | os.PathLike, *args: str, cwd: str | os.PathLike,
               env: Mapping[str, str] | None = None, options: Sequence[str] = ()) -> int:
        """Submits `script args…` from cwd; returns the job id. env is added to os.environ and exported to the job."""
        proc = self._run(["sbatch", "--parsable", *options, str(script), *map(str, args)], cwd=cwd, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {script} failed ({proc.returncode}): {proc.stderr.strip()}\n"
                               f"{self.log_tails()}")
        return int(proc.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o ID` as a dict; after slurmctld forgets the job, the jobcomp/filetxt record."""
        proc = self._run(["scontrol", "show", "job", "-o", str(job_id)])
        if proc.returncode == 0 and proc.stdout.strip():
            return _parse_fields(proc.stdout)
        for line in reversed(self._read(self.root / "jobcomp.txt").splitlines()):
            if line.startswith(f"JobId={job_id} "):
                return _parse_fields(line)
        raise RuntimeError(f"job {job_id} unknown to scontrol ({proc.stderr.strip()}) and jobcomp")

    def wait(self, job_id: int, timeout_s: float = 120.0) -> str:
        """Polls until the job reaches a final state and returns it; on timeout scancels and raises TimeoutError."""
        deadline = time.monotonic() + timeout_s
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.job_info(job_id).get("JobState", "UNKNOWN")
            if state in FINAL_STATES:
                return state
            self._check_daemons(RuntimeError)
            time.sleep(0.5)
        self._run(["scancel", str(job_id)])
        raise TimeoutError(f"job {job_id} still {state} after {timeout_s:.0f} s (cancelled)\n{self.log_tails()}")

    def log_tails(self, lines: int = 30) -> str:
        parts = [f"--- {name} ({path.name}) ---\n{_tail(path, lines)}" for name, path in self._logs.items()
                 if path.exists()]
        return "\n".join(parts)

    # --- internals -------------------------------------------------------------------------------------------
    def _run(self, cmd: list[str], cwd=None, env: Mapping[str, str] | None = None,
             timeout: float = 30) -> subprocess.CompletedProcess:
        full_env = dict(os.environ, **self.env(), **(env or {}))
        cmd = [_which(cmd[0]) or cmd[0], *cmd[1:]]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=full_env, timeout=timeout)

    @staticmethod
    def _read(path: Path) -> str:
        try:
            return path.read_text(errors="replace")
        except OSError:
            return ""

    def _spawn(self, name: str, cmd: list[str]) -> None:
        """Starts a daemon in the foreground, in its own session, its stdout+stderr in <root>/<name>.out."""
        out = open(self.root / f"{name}.out", "wb")  # noqa: SIM115 (the child holds it; closed below)
        try:
            self._procs[name] = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent,
                env=dict(os.environ, **self.env()) if name != "munged" else dict(os.environ))
        finally:
            out.close()
        # In the foreground each daemon logs to stderr too, and a fatal config error reaches only stderr.
        self._logs[name] = self.root / f"{name}.out"

    def _start_munged(self) -> None:
        munge_dir = self.root / "munge"
        munge_dir.mkdir(mode=0o755)
        key = munge_dir / "munge.key"
        if _which("mungekey"):
            subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        else:  # munge < 0.5.14: 1 KiB from urandom, as create-munge-key does
            key.write_bytes(os.urandom(1024))
        os.chown(key, 0, 0)
        key.chmod(0o400)
        self._sock = munge_dir / "munge.socket"
        # --foreground logs to stderr (munged.out), never /var/log/munge; --force: run despite /tmp's permissions.
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--socket={self._sock}",
                               f"--key-file={key}", f"--pid-file={munge_dir / 'munged.pid'}",
                               f"--seed-file={munge_dir / 'munged.seed'}"])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._procs["munged"].poll() is not None:
                raise SlurmStartError(f"munged exited with {self._procs['munged'].returncode}\n{self.log_tails()}")
            if self._sock.exists():
                cred = subprocess.run([_which("munge"), "-n", "-S", str(self._sock)], capture_output=True)
                check = subprocess.run([_which("unmunge"), "-S", str(self._sock)], input=cred.stdout,
                                       capture_output=True)
                if cred.returncode == 0 and check.returncode == 0:
                    return
            time.sleep(0.2)
        raise SlurmStartError(f"munged socket {self._sock} not answering after 15 s\n{self.log_tails()}")

    def _write_slurm_conf(self) -> None:
        r = self.root
        for sub in ("state", "spool"):
            (r / sub).mkdir()
        ctld_port, slurmd_port = _free_ports(2)
        cpus = len(os.sched_getaffinity(0))
        (r / "plugstack.conf").write_text("")  # not Debian's /etc/slurm/plugstack.conf.d: no foreign SPANK plugins
        (r / "slurm.conf").write_text(f"""\
# Written by tests/slurm_cluster.py: a throwaway single-host cluster; everything lives under {r}.
ClusterName=exaforce-test
SlurmctldHost={self.node}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self._sock}
CredType=cred/munge
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'slurmctld.log'}
SlurmdLogFile={r / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={r / 'plugstack.conf'}
# No cgroups: processes tracked through /proc, tasks not bound.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
# No accounting database: final states and exit codes go to a text file as well as to scontrol.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={r / 'jobcomp.txt'}
MinJobAge=600
KillWait=5
InactiveLimit=0
NodeName={self.node} CPUs={cpus} RealMemory={_real_memory_mb()} State=UNKNOWN
PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    def _wait_node_idle(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        state = "no answer"
        while time.monotonic() < deadline:
            self._check_daemons()
            proc = self._run(["sinfo", "-h", "-N", "-n", self.node, "-o", "%T %E"], timeout=10)  # state, reason
            state = proc.stdout.strip() or proc.stderr.strip() or state
            if proc.returncode == 0 and state.split()[0] == "idle":
                return
            time.sleep(0.5)
        raise SlurmStartError(f"node {self.node} not idle after {self.startup_timeout_s:.0f} s (sinfo: {state})\n"
                              f"{self.log_tails()}")

    def _check_daemons(self, error: type[Exception] = SlurmStartError) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise error(f"{name} exited with {proc.returncode}\n{self.log_tails()}")

    def _cancel_all_jobs(self, timeout_s: float) -> None:
        """scancel every job and wait (bounded) until slurmctld lists none, so job steps end through Slurm."""
        self._run(["scancel", "--full", f"--partition={self.partition}"], timeout=10)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            proc = self._run(["squeue", "-h", "-t", "all", "-o", "%T"], timeout=10)
            if proc.returncode == 0 and not set(proc.stdout.split()) - FINAL_STATES:
                return
            time.sleep(0.2)

    def _kill_job_leftovers(self) -> None:
        """Kills by pid every process whose environment holds our SLURM_CONF (slurmstepd, job scripts, ranks)."""
        if self.root is None:
            return
        marker = f"SLURM_CONF={self.root / 'slurm.conf'}".encode()
        for _ in range(5):  # a dying shell may fork once more: look again until none is left
            found = []
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit() or int(entry.name) == os.getpid():
                    continue
                try:
                    if marker in (entry / "environ").read_bytes().split(b"\0"):
                        found.append(int(entry.name))
                except OSError:
                    continue
            for pid in found:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if not found:
                return
            time.sleep(0.5)


def _parse_fields(text: str) -> dict[str, str]:
    """`Key=Value Key=Value …` (one `scontrol -o` or jobcomp line) → dict; values hold no spaces there."""
    return dict(tok.split("=", 1) for tok in text.split() if "=" in tok)
