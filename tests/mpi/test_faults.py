"""Fault tolerance through the real CLI on 2 ranks (float64, small-moe, 24 EMT structures, global batch 4):
a run stopped by a signal and resumed equals the uninterrupted run; a killed, failing or hung rank
ends the job within a bounded time; a checkpoint write that fails half-way costs nothing; a NaN is
skipped or stops the run, as configured. Faults are injected by tests/mpi/fault_ranks.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import MPIEXEC, REPO, run_cli, run_mpi
from exaforce import checkpoint
from exaforce.faults import NONFINITE_EXIT_CODE, REQUEUE_EXIT_CODE

pytestmark = [pytest.mark.mpi, pytest.mark.faults]

STEPS = 20


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    xyz, bp = str(folder / "m.extxyz"), str(folder / "m.bp")
    assert run_cli(["data", "synth", "--out", xyz, "--structures", "24", "--seed", "3"]).returncode == 0
    assert run_cli(["data", "convert", xyz, "--out", bp, "--name", "m"]).returncode == 0
    return folder / "m.bp"


def config(path: Path, data: Path, out_dir: Path, dp: int, ep: int, **run) -> Path:
    """The tests' run: 20 steps crossing 3 epochs (6 steps each), checkpoints every 2 steps, all kept."""
    run = {"out_dir": str(out_dir), "steps": STEPS, "dtype": "float64", "checkpoint_every": 2, "keep_checkpoints": 0,
           "log_every": 1, **run}
    lines = ["[run]", *(f"{k} = {json.dumps(v)}" for k, v in run.items()),
             "[data]", f"train = [{json.dumps(str(data))}]", "global_batch_size = 4",
             "[model]", 'preset = "small-moe"', "[parallel]", f"dp = {dp}", f"ep = {ep}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def train(ranks: int, cfg: Path, *args: str, fault: tuple | None = None) -> subprocess.CompletedProcess:
    """`mpiexec -n ranks exaforce train --config cfg args…`, through fault_ranks.py when a fault is injected."""
    entry = [str(REPO / "tests/mpi/fault_ranks.py"), *map(str, fault)] if fault else ["-m", "exaforce.cli"]
    return run_mpi(ranks, [*entry, "train", "--config", str(cfg), *args], timeout=240)


def launch(cfg: Path) -> subprocess.Popen:
    """`mpiexec -n 2 exaforce train --config cfg` in the background (the test signals or kills it)."""
    return subprocess.Popen([str(MPIEXEC), "-n", "2", sys.executable, "-m", "exaforce.cli", "train", "--config",
                             str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))


def records(run_dir: Path, rank: int = 0) -> list[dict]:
    return [json.loads(line) for line in (run_dir / f"perf/rank-{rank:05d}.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    """The global mean loss of each step; a step recorded again after a resume: the later record."""
    return {r["step"]: r["loss"] for r in records(run_dir) if r["kind"] == "step"}


def parameters(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return checkpoint.load(checkpoint.step_folder(run_dir, step))["model"]


def assert_same_run(run: Path, reference: Path, tol: float, steps: range = range(1, STEPS + 1)) -> None:
    got, want = losses(run), losses(reference)
    assert sorted(got) == sorted(want) == list(steps)
    worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in steps)
    assert worst <= tol, (worst, got, want)  # relative, every step's global loss
    final, expected = parameters(run, steps[-1]), parameters(reference, steps[-1])
    assert final.keys() == expected.keys()
    worst_param = 0.0
    for name, tensor in expected.items():
        diff = float((final[name] - tensor).abs().max()) / max(float(tensor.abs().max()), 1e-300)
        assert diff <= tol, (name, diff)  # relative to the tensor's largest entry
        worst_param = max(worst_param, diff)
    print(f"{run.name} vs {reference.name}: max relative difference of losses {worst:.2e}, "
          f"parameters {worst_param:.2e}")


_runs: dict[tuple, Path] = {}


def straight(dataset: Path, root: Path, dp: int, ep: int) -> Path:
    """20 uninterrupted steps on dp × ep (run once per layout and module)."""
    if ("straight", dp, ep) not in _runs:
        run_dir = root / f"straight-{dp}x{ep}"
        proc = train(2, config(root / f"straight-{dp}x{ep}.toml", dataset, run_dir, dp, ep))
        assert proc.returncode == 0, proc.stderr[-3000:]
        _runs["straight", dp, ep] = run_dir
    return _runs["straight", dp, ep]


def interrupted(dataset: Path, root: Path, dp: int, ep: int) -> Path:
    """10 steps, then SIGTERM reaches rank 1 only: every rank checkpoints step 10 and exits 75. Returns
    a pristine copy of that run folder (each test resumes its own copy)."""
    if ("interrupted", dp, ep) not in _runs:
        run_dir = root / f"interrupted-{dp}x{ep}"
        cfg = config(root / f"interrupted-{dp}x{ep}.toml", dataset, run_dir, dp, ep)
        proc = train(2, cfg, fault=("sigterm", 1, 10))
        assert proc.returncode == REQUEUE_EXIT_CODE, proc.stderr[-3000:]
        folder = checkpoint.step_folder(run_dir, 10)
        assert (f"signal SIGTERM received at step 10: checkpoint written to {folder}; exiting 75 for requeue"
                in proc.stdout), proc.stdout[-2000:]
        assert checkpoint.latest(run_dir) == folder and max(losses(run_dir)) == 10
        shutil.copytree(run_dir, root / f"pristine-{dp}x{ep}")
        _runs["interrupted", dp, ep] = root / f"pristine-{dp}x{ep}"
    return _runs["interrupted", dp, ep]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def resume_copy(pristine: Path, to: Path, data: Path, dp: int, ep: int, ranks: int) -> subprocess.CompletedProcess:
    shutil.copytree(pristine, to)
    return train(ranks, config(to.with_suffix(".toml"), data, to, dp, ep), "--resume")


@pytest.mark.parametrize("dp, ep", [(2, 1), pytest.param(1, 2, marks=pytest.mark.slow)])
def test_sigterm_and_resume_equals_the_straight_run(dataset, root, dp, ep):
    """Acceptance 1: 20 steps straight == 10 steps + SIGTERM + resume for 10 (losses and parameters to 1e-12)."""
    reference = straight(dataset, root, dp, ep)
    run_dir = root / f"resumed-{dp}x{ep}"
    proc = resume_copy(interrupted(dataset, root, dp, ep), run_dir, dataset, dp, ep, ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {checkpoint.step_folder(run_dir, 10)} at step 10" in proc.stdout
    assert_same_run(run_dir, reference, tol=1e-12)  # float64; measured: bit for bit
    for rank in (0, 1):  # perf logs appended: a second header, every step once after the resume
        kinds = [(r["kind"], r.get("resumed_from_step")) for r in records(run_dir, rank)]
        segment = [("step", None)] * 10
        assert kinds == [("header", None), *segment, ("header", 10), *segment, ("end", None)]


@pytest.mark.slow
@pytest.mark.parametrize("before, after, ranks", [((2, 1), (1, 1), 1), ((1, 2), (2, 1), 2)],
                         ids=["dp2-to-1rank", "ep2-to-ep1"])
def test_resume_on_another_layout(dataset, root, before, after, ranks):
    """The same global batches on another data-parallel width; experts re-sharded for another EP size.
    Only the order of floating-point sums changes: 1e-10."""
    reference = straight(dataset, root, *before)
    run_dir = root / f"relayout-{before}-{after}".replace(" ", "")
    proc = resume_copy(interrupted(dataset, root, *before), run_dir, dataset, *after, ranks=ranks)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"dp × ep = {before[0]} × {before[1]} → {after[0]} × {after[1]}" in proc.stdout, proc.stdout[-2000:]
    assert_same_run(run_dir, reference, tol=1e-10)


@pytest.mark.slow
def test_scheduler_signal_through_mpiexec(dataset, root, tmp_path):
    """SIGUSR1 sent to mpiexec (as `scancel --signal` or a batch script's trap would): mpiexec forwards it,
    the ranks checkpoint at the next step boundary, exit 75; resumed, the run still equals the straight one."""
    reference = straight(dataset, root, 2, 1)
    run_dir = tmp_path / "run"
    cfg = config(tmp_path / "run.toml", dataset, run_dir, 2, 1, checkpoint_every=0)
    proc = launch(cfg)
    perf = run_dir / "perf/rank-00001.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (perf.exists() and '"step":3,' in perf.read_text()):
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    (step,) = map(int, re.findall(r"signal SIGUSR1 received at step (\d+): checkpoint written to", out))
    assert 3 <= step < STEPS and checkpoint.latest(run_dir) == checkpoint.step_folder(run_dir, step)
    proc = train(2, cfg, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(run_dir, reference, tol=1e-12)


def test_kill_9_of_one_rank_ends_the_job_and_the_last_checkpoint_resumes(dataset, root, tmp_path):
    """Acceptance 2: kill -9 one rank mid-run; the job exits non-zero within 60 s; the last complete
    checkpoint loads, and resuming from it ends where the straight run ends."""
    reference = straight(dataset, root, 2, 1)
    run_dir = tmp_path / "run"
    cfg = config(tmp_path / "run.toml", dataset, run_dir, 2, 1)
    proc = launch(cfg)
    marker = checkpoint.step_folder(run_dir, 4) / "COMPLETE"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not marker.exists():
        time.sleep(0.01)
    pid = records(run_dir, 1)[0]["pid"]  # rank 1's process, from its perf-log header
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    proc.communicate(timeout=120)
    seconds = time.monotonic() - killed
    print(f"kill -9 of rank 1 → mpiexec exited {proc.returncode} after {seconds:.3f} s")
    assert proc.returncode != 0 and seconds < 60
    last = checkpoint.latest(run_dir)
    assert last is not None and checkpoint.load(last)["step"] >= 4
    proc = train(2, cfg, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {last}" in proc.stdout
    assert_same_run(run_dir, reference, tol=1e-12)


def test_exception_on_one_rank_aborts_every_rank(dataset, tmp_path):
    """A RuntimeError on rank 1 in step 3: reported with its rank, every rank aborted at once."""
    proc = train(2, config(tmp_path / "run.toml", dataset, tmp_path / "run", 2, 1), fault=("raise", 1, 3))
    end = time.time()
    (injected,) = map(float, re.findall(r"fault: RuntimeError in step 3 on rank 1 at ([\d.]+)", proc.stderr))
    print(f"exception on rank 1 → mpiexec exited {proc.returncode} after {end - injected:.3f} s")
    assert proc.returncode != 0 and end - injected < 60
    assert "exaforce: error: rank 1: RuntimeError: injected failure in step 3; aborting all 2 rank(s)" in proc.stderr
    assert "[rank 1] Traceback" in proc.stderr
    assert "rank 1: RuntimeError: injected failure in step 3" in (tmp_path / "run" / "ABORTED").read_text()


def test_watchdog_aborts_a_hung_job(dataset, tmp_path):
    """Rank 1 hangs in step 3 while rank 0 waits for it in a collective: the watchdog (step_timeout_s = 3)
    aborts the job instead of letting it burn its allocation, and says why on stderr and in RUN/ABORTED."""
    cfg = config(tmp_path / "run.toml", dataset, tmp_path / "run", 2, 1, step_timeout_s=3.0)
    proc = train(2, cfg, fault=("hang", 1, 3))
    end = time.time()
    (injected,) = map(float, re.findall(r"fault: hang in step 3 on rank 1 at ([\d.]+)", proc.stderr))
    print(f"hang on rank 1 → mpiexec exited {proc.returncode} after {end - injected:.3f} s (timeout 3 s)")
    assert proc.returncode != 0 and end - injected < 3 + 30
    message = r"rank [01]: no progress for \d+ s in step 3 \(run.step_timeout_s = 3\)"
    assert re.search(message, proc.stderr), proc.stderr[-2000:]
    aborted = (tmp_path / "run" / "ABORTED").read_text()
    assert re.search(message, aborted), aborted


@pytest.mark.slow
def test_checkpoint_write_failing_half_way_leaves_the_previous_one(dataset, root, tmp_path):
    """Acceptance 3: rank 1's expert shard of the second checkpoint (step 4) fails half-way (ENOSPC):
    the job ends; step 2 stays the latest complete checkpoint, loads, and resuming from it ends where
    the straight run ends; the half-written folder is never taken for a checkpoint and the next save
    deletes it."""
    reference = straight(dataset, root, 1, 2)
    run_dir = tmp_path / "run"
    cfg = config(tmp_path / "run.toml", dataset, run_dir, 1, 2)
    proc = train(2, cfg, fault=("disk-full", 1, 2))
    assert proc.returncode == 2  # a full disk is the user's to fix: one line naming the file, every rank stopped
    assert re.search(r"exaforce: error: \S+/\.step-00000004\.partial/experts-ep1\.pt: no space left on device",
                     proc.stderr), proc.stderr
    partial = run_dir / "checkpoints/.step-00000004.partial"
    assert partial.is_dir() and not (partial / "COMPLETE").exists()
    assert not (partial / "experts-ep1.pt").exists() and not list(partial.glob(".experts-ep1.pt.*"))  # temp removed
    assert not checkpoint.step_folder(run_dir, 4).exists()
    assert checkpoint.latest(run_dir) == checkpoint.step_folder(run_dir, 2)
    assert checkpoint.load(checkpoint.step_folder(run_dir, 2))["step"] == 2
    proc = train(2, cfg, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not partial.exists()
    assert_same_run(run_dir, reference, tol=1e-12)


def test_nan_skipped(dataset, root, tmp_path):
    """Acceptance 4, run.nonfinite = "skip": a NaN label on rank 1 in step 3 → no update in step 3 on any
    rank (step 3's checkpoint holds step 2's parameters), counted in the perf log, said in the log."""
    run_dir = tmp_path / "run"
    cfg = config(tmp_path / "run.toml", dataset, run_dir, 2, 1, steps=5, checkpoint_every=1, nonfinite="skip")
    proc = train(2, cfg, fault=("nan", 1, 3))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ('step 3: non-finite loss (nan) or gradient norm (nan): step skipped, no parameter update '
            '(run.nonfinite = "skip"; 1 skipped so far)') in proc.stdout, proc.stdout[-2000:]
    for rank in (0, 1):
        steps = {r["step"]: r for r in records(run_dir, rank) if r["kind"] == "step"}
        assert steps[3]["skipped"] is True and [steps[s]["skipped_steps"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
        assert not any(steps[s].get("skipped") for s in (1, 2, 4, 5))
        assert records(run_dir, rank)[-1] == {**records(run_dir, rank)[-1], "kind": "end", "skipped_steps": 1}
    before, after = parameters(run_dir, 2), parameters(run_dir, 3)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(after[k], v) for k, v in parameters(run_dir, 4).items())
    assert all(torch.isfinite(v).all() for v in parameters(run_dir, 5).values())


def test_nan_stops_with_the_last_good_state(dataset, root, tmp_path):
    """Acceptance 4, run.nonfinite = "stop": a NaN label on rank 1 in step 3 → checkpoint of step 2 (the
    parameters before the bad update, equal to the straight run's at step 2), a message naming step 3,
    exit 3 (not 75: resubmitting would meet the same batch)."""
    reference = straight(dataset, root, 2, 1)
    run_dir = tmp_path / "run"
    cfg = config(tmp_path / "run.toml", dataset, run_dir, 2, 1, checkpoint_every=0)  # nonfinite = "stop" by default
    proc = train(2, cfg, fault=("nan", 1, 3))
    assert proc.returncode == NONFINITE_EXIT_CODE, proc.stderr[-3000:]
    folder = checkpoint.step_folder(run_dir, 2)
    assert (f'step 3: non-finite loss (nan) or gradient norm (nan): stopping (run.nonfinite = "stop"); the last '
            f'good state (step 2) is in {folder}; exiting 3') in proc.stdout, proc.stdout[-2000:]
    assert checkpoint.latest(run_dir) == folder
    got, want = parameters(run_dir, 2), parameters(reference, 2)
    assert all(float((got[k] - v).abs().max()) <= 1e-12 * float(v.abs().max()) for k, v in want.items())


# ---------------------------------------------------------------- the pieces, without MPI
def test_global_batches_depend_on_the_step_only():
    """The sampler position is the step: starting at step k gives steps k+1, k+2, … of the full sequence,
    and the global batches are the same for any number of ranks (fractional weights: epochs of varying
    length are crossed)."""
    import itertools

    import numpy as np

    from exaforce.io.sampler import global_batches

    weight, train_G = np.r_[np.ones(30), np.full(10, 0.5), np.full(5, 2.5)], np.ones(45, bool)
    full = list(itertools.islice(global_batches(weight, train_G, 8, 1, seed=7), 40))
    assert len({epoch for epoch, _ in full}) >= 5 and min(len(b) for _, b in full) >= 8
    for world in (2, 4, 8):
        other = list(itertools.islice(global_batches(weight, train_G, 8, world, seed=7), 40))
        assert all(e == f and np.array_equal(b, c) for (e, b), (f, c) in zip(full, other))
    for start in (1, 5, 6, 17, 33):
        resumed = list(itertools.islice(global_batches(weight, train_G, 8, 2, seed=7, start_step=start), 40 - start))
        assert all(e == f and np.array_equal(b, c) for (e, b), (f, c) in zip(full[start:], resumed))


def test_perf_log_appends_after_a_torn_line(tmp_path):
    from exaforce.perf.log import PerfLogWriter, rank_log_path

    log = PerfLogWriter(tmp_path, 0)
    log.header(rank=0, world_size=1, config={}, topology={}, machine={}, flop_coefficients={})
    log.close()
    with open(rank_log_path(tmp_path, 0), "a") as f:
        f.write('{"kind":"step","step":1,"epo')  # killed mid-write
    log = PerfLogWriter(tmp_path, 0, append=True)
    log.header(rank=0, world_size=1, config={}, topology={}, machine={}, flop_coefficients={}, resumed_from_step=0)
    log.close()
    lines = [json.loads(line) for line in rank_log_path(tmp_path, 0).read_text().splitlines()]
    assert [(r["kind"], r.get("resumed_from_step")) for r in lines] == [("header", None), ("header", 0)]


def test_only_complete_checkpoint_folders_count(tmp_path):
    """A folder counts when COMPLETE lists every file with its size: not when a file is missing or cut
    short, not when COMPLETE is absent or torn, never a hidden .partial folder."""
    root = tmp_path / "checkpoints"
    for step, damage in ((2, None), (4, "truncated"), (6, "no marker"), (8, "torn marker"), (10, "missing file")):
        folder = root / f"step-{step:08d}"
        folder.mkdir(parents=True)
        (folder / "dense.pt").write_bytes(b"x" * 100)
        marker = json.dumps({"step": step, "files": {"dense.pt": 100}})
        if damage == "truncated":
            (folder / "dense.pt").write_bytes(b"x" * 50)
        if damage == "missing file":
            (folder / "dense.pt").unlink()
        if damage != "no marker":
            (folder / "COMPLETE").write_text(marker[:10] if damage == "torn marker" else marker)
    (root / ".step-00000012.partial").mkdir()
    assert checkpoint.checkpoints(tmp_path) == [root / "step-00000002"]
    assert checkpoint.latest(tmp_path) == root / "step-00000002"
