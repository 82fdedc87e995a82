"""A real single-host Slurm cluster (tests/slurm_cluster.py): a 2-rank MPI batch job, a failing job, no leaks.

Skips, with the reason, where Slurm cannot run (binaries missing: `make slurm`; not root; daemons fail to start).
"""

import sys
import time
from pathlib import Path

import pytest

import slurm_cluster
from slurm_cluster import SlurmCluster, pid_alive, running_cluster

pytestmark = pytest.mark.slurm

VENV_BIN = Path(sys.executable).parent
# PYTHONUNBUFFERED off: buffered, each rank's line reaches the shared output file in one write, so the
# two ranks' lines cannot interleave mid-line ("01 2\n 2") as they do unbuffered.
JOB_ENV = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": ""}

MPI_JOB = """\
#!/bin/bash
#SBATCH --job-name=exaforce-mpi-hello
#SBATCH --nodes=1
#SBATCH --ntasks=2
#SBATCH --time=5
#SBATCH --output=mpi-%j.out
set -euo pipefail
mpiexec="$1"; python="$2"
"$mpiexec" -n 2 "$python" -c \\
  "from mpi4py import MPI; print(MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size())"
"""

FAILING_JOB = """\
#!/bin/bash
#SBATCH --ntasks=1
#SBATCH --time=1
#SBATCH --output=fail-%j.out
echo "about to exit 3"
exit 3
"""

SLEEPING_JOB = """\
#!/bin/bash
#SBATCH --ntasks=1
#SBATCH --output=sleep-%j.out
echo $$ > "$1"
sleep 600
"""


def _assert_all_dead(pids: dict[str, int]) -> None:
    deadline = time.monotonic() + 5  # SIGKILLed job processes may take a moment to leave /proc
    while any(pid_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = {name: pid for name, pid in pids.items() if pid_alive(pid)}
    assert not alive, f"left running after the cluster stopped: {alive}"


@pytest.mark.mpi
def test_mpi_job_runs_two_ranks(tmp_path):
    """sbatch → mpiexec -n 2 (the venv's mpich) inside the allocation → ranks 0 and 1 of 2 in the output file."""
    script = tmp_path / "mpi.sh"
    script.write_text(MPI_JOB)
    with running_cluster() as cluster:
        pids = cluster.pids
        job_id = cluster.sbatch(script, VENV_BIN / "mpiexec", sys.executable, cwd=tmp_path, env=JOB_ENV)
        state = cluster.wait(job_id, timeout_s=120)
        out = tmp_path / f"mpi-{job_id}.out"
        text = out.read_text() if out.exists() else "<no output file>"
        assert state == "COMPLETED", f"{state}\n{text}\n{cluster.log_tails()}"
        assert cluster.job_info(job_id)["ExitCode"] == "0:0"
    assert sorted(line.split() for line in text.splitlines() if line.strip()) == [["0", "2"], ["1", "2"]], text
    _assert_all_dead(pids)


def test_failing_job_ends_failed_with_exit_code(tmp_path):
    script = tmp_path / "fail.sh"
    script.write_text(FAILING_JOB)
    with running_cluster() as cluster:
        pids = cluster.pids
        job_id = cluster.sbatch(script, cwd=tmp_path, env=JOB_ENV)
        assert cluster.wait(job_id, timeout_s=60) == "FAILED", cluster.log_tails()
        assert cluster.job_info(job_id)["ExitCode"] == "3:0"
        assert f"JobId={job_id} " in (cluster.root / "jobcomp.txt").read_text()  # jobcomp/filetxt records it
    assert (tmp_path / f"fail-{job_id}.out").read_text() == "about to exit 3\n"
    _assert_all_dead(pids)


def test_error_in_body_leaves_no_daemons_or_jobs(tmp_path):
    """An exception inside `with` still stops the daemons and kills a running job's processes."""
    script = tmp_path / "sleep.sh"
    script.write_text(SLEEPING_JOB)
    pid_file = tmp_path / "job.pid"
    with pytest.raises(RuntimeError, match="test body failed"), running_cluster() as cluster:
        pids = cluster.pids
        root = cluster.root
        job_id = cluster.sbatch(script, pid_file, cwd=tmp_path, env=JOB_ENV)
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert cluster.job_info(job_id)["JobState"] == "RUNNING", cluster.log_tails()
        pids["job script"] = int(pid_file.read_text())
        raise RuntimeError("test body failed")
    _assert_all_dead(pids)
    assert not root.exists()


def test_unstarted_cluster_stops_cleanly():
    """stop() before start() (and twice) is a no-op, so a failed start-up never raises from cleanup."""
    cluster = SlurmCluster()
    cluster.stop()
    cluster.stop()
    assert cluster.pids == {}


def test_unavailable_reason_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(slurm_cluster, "_which", lambda name: None if name in ("slurmd", "sbatch") else "/bin/true")
    assert "binaries missing: slurmd, sbatch" in slurm_cluster.slurm_unavailable_reason()
    monkeypatch.setattr(slurm_cluster, "_which", lambda name: "/bin/true")
    monkeypatch.setattr(slurm_cluster.os, "geteuid", lambda: 1000)
    assert "runs its daemons as root; this is uid 1000" in slurm_cluster.slurm_unavailable_reason()


def test_failed_start_skips_with_the_daemon_log(monkeypatch):
    """A node slurmctld rejects (more memory configured than present) → skip naming sinfo's reason and the logs."""
    if slurm_cluster.slurm_unavailable_reason():
        pytest.skip(slurm_cluster.slurm_unavailable_reason())
    monkeypatch.setattr(slurm_cluster, "_real_memory_mb", lambda: 10**8)
    with pytest.raises(pytest.skip.Exception, match=r"(?s)not idle after 5 s.*Low RealMemory.*--- slurmd"):
        with running_cluster(startup_timeout_s=5):
            pass
