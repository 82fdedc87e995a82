"""A run that cannot go on says why and loses nothing: one run per run folder (a second train is
refused while the first holds its lock), a scheduler signal during start-up exits 75 for requeue,
an unwritable run folder is one line and exit 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_emt_dataset, run_cli, small_run_config

pytestmark = pytest.mark.faults

EXAFORCE = str(Path(sys.executable).parent / "exaforce")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reliability")
    make_emt_dataset(root, 8)
    small_run_config(root, steps=4, log_every=1)
    return root


def _train(workdir: Path, out_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([EXAFORCE, "train", "--config", "run.toml", "--out-dir", str(out_dir), *extra],
                            cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def _wait_for(condition, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has installed a handler for `signum` (/proc/PID/status SigCgt)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask >> (signum - 1) & 1)


def test_a_second_run_into_the_same_folder_is_refused(workdir, tmp_path):
    """The first run is frozen (SIGSTOP) once it holds the lock, so the second meets it for certain."""
    out_dir = tmp_path / "run"
    first = _train(workdir, out_dir)
    _wait_for(lambda: (out_dir / ".lock").exists() and f"pid {first.pid}" in (out_dir / ".lock").read_text(),
              "the first run's lock")
    first.send_signal(signal.SIGSTOP)
    try:
        second = _train(workdir, out_dir)
        _, err = second.communicate(timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, err
    assert f"run.out_dir = {out_dir} is in use by another exaforce train (pid {first.pid} on" in err, err
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert "step     4/4" in out
    steps = [line for line in (out_dir / "perf" / "rank-00000.jsonl").read_text().splitlines() if '"kind":"step"' in line]
    assert len(steps) == 4  # one run's log, untorn
    again = run_cli(["train", "--config", "run.toml", "--out-dir", str(out_dir), "--resume", "--steps", "5"], cwd=workdir)
    assert again.returncode == 0, again.stderr  # the lock went with the first process


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_during_start_up_exits_75(workdir, tmp_path, signum):
    """Sent as soon as the process catches it (SigCgt, so no timing luck): start-up is seconds
    long here and no step can have run; one process, as the scheduler's signal reaches each rank."""
    proc = _train(workdir, tmp_path / "run")
    _wait_for(lambda: _catches(proc.pid, signum), "the signal handlers")
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, out + err
    name = signal.Signals(signum).name
    assert f"signal {name} received" in out and "no step ran, nothing new to checkpoint; exiting 75" in out, out
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_unwritable_run_folder_is_one_line_and_exit_2(workdir, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    result = run_cli(["train", "--config", "run.toml", "--out-dir", str(tmp_path / "file" / "run")], cwd=workdir)
    assert result.returncode == 2, result.stderr
    assert f"exaforce: error: run.out_dir = {tmp_path / 'file' / 'run'}: cannot write there" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_two_structure_dataset_trains(tmp_path):
    """Too few distinct structures to calibrate four coefficients: a warning and a fit within their span."""
    make_emt_dataset(tmp_path, 2, seed=3, name="two")
    small_run_config(tmp_path, "two.bp", "two.toml", out_dir="run", steps=2, log_every=1)
    result = run_cli(["train", "--config", "two.toml"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "calibration: degenerate calibration" in result.stdout and "step     2/2" in result.stdout, result.stdout


def test_resume_says_which_newer_checkpoint_it_skipped_and_why(workdir, tmp_path):
    out_dir = tmp_path / "run"
    result = run_cli(["train", "--config", "run.toml", "--out-dir", str(out_dir), "--steps", "2",
                      "--set", "run.checkpoint_every=1", "--set", "run.final_checkpoint=false"], cwd=workdir)
    assert result.returncode == 0, result.stderr
    dense = out_dir / "checkpoints" / "step-00000002" / "dense.pt"
    size = dense.stat().st_size
    with open(dense, "r+b") as f:
        f.truncate(size // 2)
    result = run_cli(["train", "--config", "run.toml", "--out-dir", str(out_dir), "--steps", "3", "--resume"],
                     cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert (f"resume: skipped step-00000002, newer but not a complete checkpoint: dense.pt has {size // 2} bytes, "
            f"COMPLETE lists {size} (cut short?)") in result.stdout, result.stdout
    assert "at step 1" in result.stdout


def test_a_time_budget_ends_the_run_with_its_checkpoint(workdir, tmp_path):
    """run.max_seconds counts start-up too: a budget of 1 s is spent before step 2, so the run stops
    there (at least one step is taken), writes its final checkpoint and model file, and exits 0."""
    small_run_config(tmp_path, str(workdir / "emt.bp"), "budget.toml", out_dir="run", steps=1000, log_every=1,
                     max_seconds=1.0)
    result = run_cli(["train", "--config", "budget.toml"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "time budget run.max_seconds = 1 s spent after step 1: stopping with the final checkpoint" in result.stdout
    model_file = result.stdout.split("; model: ")[1].split()[0]
    assert "step     2/1000" not in result.stdout and Path(model_file).exists(), result.stdout


def test_with_a_weight_average_a_resumed_run_equals_the_straight_run(workdir, tmp_path):
    """optim.ema_decay: the checkpoint's model holds the averaged weights and its optimizer state the
    raw ones; 4 steps straight == 2 steps, then a resume for 2 (float64, bit for bit), and the
    averaged weights differ from the raw ones (the average is what ships)."""
    from exaforce import checkpoint

    runs = {}
    for name, stops in (("straight", [4]), ("resumed", [2, 4])):
        config = small_run_config(tmp_path, str(workdir / "emt.bp"), f"{name}.toml", out_dir=name, steps=4,
                                  dtype="float64", checkpoint_every=2, keep_checkpoints=0)
        config.write_text(config.read_text() + "[optim]\nema_decay = 0.5\n")
        for steps in stops:
            result = run_cli(["train", "--config", config.name, "--steps", str(steps), "--resume"], cwd=tmp_path)
            assert result.returncode == 0, result.stderr
        runs[name] = checkpoint.read(checkpoint.step_folder(tmp_path / name, 4) / "dense.pt")
    straight, resumed = runs["straight"], runs["resumed"]
    for name, tensor in straight["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    states = straight["optimizer"]  # by parameter name
    assert states and all("ema" in s for s in states.values())
    for name, state in states.items():
        assert torch.equal(resumed["optimizer"][name]["ema"], state["ema"]), name
    assert any(not torch.equal(state["ema"], straight["model"][name]) for name, state in states.items())
