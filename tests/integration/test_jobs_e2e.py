"""Rendered jobs run for real: a local weak-scaling campaign (1 and 2 ranks) and a `slurm` job of the
demo's multi-fidelity training on 2 ranks under a real single-host Slurm; both end in perf reports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_cluster import running_cluster

pytestmark = [pytest.mark.jobs, pytest.mark.mpi, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
EXAFORCE = str(VENV_BIN / "exaforce")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}


def _run(*args: str, cwd: Path, timeout: int = 300) -> str:
    result = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _demo_data(root: Path) -> Path:
    """The demo's three fidelities, small: configs/demo.toml copied to ROOT/configs reads ROOT/demo/*.bp."""
    (root / "demo").mkdir(parents=True)
    (root / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "demo.toml", root / "configs" / "demo.toml")
    for name, source, method, n in (("emt", "metals", "EMT", 24), ("gfn2", "molecules", "GFN2-xTB", 24),
                                    ("gfn1", "molecules", "GFN1-xTB", 12)):
        extra = ["--method", method] if source == "molecules" else []
        _run(EXAFORCE, "data", "synth", "--source", source, *extra, "--out", f"demo/{name}.extxyz",
             "--structures", str(n), "--seed", "0", cwd=root)
        _run(EXAFORCE, "data", "convert", f"demo/{name}.extxyz", "--out", f"demo/{name}.bp", "--name", name,
             "--method", method, cwd=root)
    return root / "configs" / "demo.toml"


def _emt_dataset(root: Path, structures: int, seed: int) -> None:
    """root/emt.bp: EMT metals from data synth."""
    _run(EXAFORCE, "data", "synth", "--out", "emt.extxyz", "--structures", str(structures), "--seed", str(seed), cwd=root)
    _run(EXAFORCE, "data", "convert", "emt.extxyz", "--out", "emt.bp", "--name", "emt", cwd=root)


@pytest.mark.perf
def test_local_weak_campaign_runs_and_reports_efficiency(tmp_path):
    _emt_dataset(tmp_path, 48, seed=1)
    (tmp_path / "tiny.toml").write_text('[run]\nsteps = 8\nlog_every = 4\nfinal_checkpoint = false\n'
                                        '[model]\npreset = "small"\n[data]\ntrain = ["emt.bp"]\nglobal_batch_size = 4\n')
    _run(EXAFORCE, "jobs", "campaign", "--machine", "local", "--mode", "weak", "--nodes", "1,2",
         "--config", "tiny.toml", "--stage-dir", str(tmp_path / "stage"), "--out", "camp", cwd=tmp_path)
    _run("bash", "camp/submit.sh", cwd=tmp_path, timeout=600)
    out = _run(EXAFORCE, "perf", "report", "camp", cwd=tmp_path)
    assert "weak scaling on local" in out, out

    report = tmp_path / "camp" / "report"
    summary = json.loads((report / "summary.json").read_text())
    points = {p["ranks"]: p for p in summary["points"]}
    assert set(points) == {1, 2} and all(p["problem"] is None and not p["missing_ranks"] for p in points.values())
    assert points[2]["global_batch"] == 2 * points[1]["global_batch"]  # weak: same batch per rank
    assert points[2]["efficiency"] == pytest.approx(points[1]["step_time_s"] / points[2]["step_time_s"], rel=1e-12)
    for name in ("report.md", "report.html", "scaling_efficiency.png", "scaling_efficiency.svg",
                 "scaling_step_time.png", "scaling_flops.png", "scaling_breakdown.png", "points/r00002/report.html"):
        assert (report / name).is_file(), name


@pytest.mark.slurm
def test_slurm_job_trains_the_demo_on_two_ranks_and_reports(tmp_path):
    config = _demo_data(tmp_path)
    run_dir = tmp_path / "run"
    _run(EXAFORCE, "jobs", "render", "--machine", "slurm", "--ranks-per-node", "2", "--config", str(config),
         "--run-dir", str(run_dir), "--stage-dir", str(tmp_path / "stage"), "--walltime", "00:10:00",
         "--set", "run.steps=10", "--set", "run.log_every=5", "--set", "run.val_every=0",
         "--out", "job.sbatch", cwd=tmp_path)
    with running_cluster() as cluster:
        job_id = cluster.sbatch(tmp_path / "job.sbatch", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
        state = cluster.wait(job_id, timeout_s=420)
        log = next(run_dir.glob("job-*.out"), None)
        assert state == "COMPLETED", (log.read_text() if log else "no job log") + cluster.log_tails()
    text = log.read_text()
    assert "exaforce job: 1 node(s), 2 ranks" in text and "staged:" in text, text

    out = _run(EXAFORCE, "perf", "report", str(run_dir), cwd=tmp_path)
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_read"] == [0, 1] and summary["n_steps"] == 10, out
    assert summary["warnings"] == [], summary["warnings"]
    assert (run_dir / "report" / "report.html").is_file()


@pytest.mark.faults
def test_local_job_checkpoints_on_the_warning_signal_and_resumes(tmp_path):
    """SIGUSR1 to the job script (what Slurm's --signal=B:USR1 does) → ranks checkpoint, exit 75; the same
    script run again resumes, and the report reads the two segments as one run."""
    import signal
    import time

    _emt_dataset(tmp_path, 32, seed=2)
    (tmp_path / "tiny.toml").write_text('[run]\nsteps = 40\nlog_every = 5\n[model]\npreset = "small"\n'
                                        '[data]\ntrain = ["emt.bp"]\nglobal_batch_size = 4\n')
    _run(EXAFORCE, "jobs", "render", "--machine", "local", "--ranks-per-node", "2", "--config", "tiny.toml",
         "--run-dir", "run", "--stage-dir", str(tmp_path / "stage"), "--out", "job.sh", cwd=tmp_path)
    job = subprocess.Popen(["bash", "job.sh"], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    perf = tmp_path / "run" / "perf" / "rank-00000.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and (not perf.exists() or perf.read_text().count('"kind":"step"') < 3):
        time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)
    out, _ = job.communicate(timeout=120)
    assert job.returncode == 75, out
    assert "exiting 75" in out or "requeue" in out, out
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("step-*/COMPLETE"))
    assert checkpoints, out
    stopped_at = int(checkpoints[-1].parent.name.split("-")[1])
    assert 3 <= stopped_at < 40

    out = _run("bash", "job.sh", cwd=tmp_path, timeout=300)  # the requeued job
    assert "resume" in out and "step    40/40" in out, out
    report = _run(EXAFORCE, "perf", "report", "run", cwd=tmp_path)
    summary = json.loads((tmp_path / "run" / "report" / "summary.json").read_text())
    assert summary["n_steps"] == 40 and summary["ranks_read"] == [0, 1], report
    assert any(f"resumed from checkpoints at step(s) {stopped_at}" in w for w in summary["warnings"]), summary["warnings"]
