"""`exaforce train` with pipeline stages (parallel.pp = 2 on 2 ranks) through the real CLI, float64,
the small preset with 2 blocks on 16 EMT structures (4 held out for validation), global batch 4 in 2
micro-batches: each stage writes its own checkpoint part; a run stopped after step 2 and resumed
equals the uninterrupted run bit for bit; the pp = 2 checkpoint continues on one rank without stages
(`train --resume`, `--init-from`) and is read whole by `predict`, `model info`, `model export` and
the ASE calculator, which predict what the pipeline predicts; a pp = 1 checkpoint splits into stages,
and an MoE pp = 2 × ep = 2 run's expert parts merge onto one rank; bad layouts are one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, make_emt_dataset, run_mpi
from exaforce import checkpoint

pytestmark = [pytest.mark.mpi, pytest.mark.faults]

STEPS = 4


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pp-train")
    make_emt_dataset(folder, 16, seed=3)
    return folder


def config(root: Path, name: str, pp: int, **run) -> Path:
    """ROOT/NAME.toml: 4 steps, a checkpoint every 2 (all kept), validation every 2, into ROOT/NAME."""
    run = {"out_dir": str(root / name), "steps": STEPS, "dtype": "float64", "checkpoint_every": 2,
           "keep_checkpoints": 0, "log_every": 1, "val_every": 2, **run}
    lines = ["[run]", *(f"{k} = {json.dumps(v)}" for k, v in run.items()),
             "[data]", "global_batch_size = 4", "micro_batches = 2",
             "[[data.datasets]]", f"path = {json.dumps(str(root / 'emt.bp'))}", "val_fraction = 0.25",
             "[model]", 'preset = "small"', "blocks = 2", "[parallel]", f"pp = {pp}"]
    path = root / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def exaforce(ranks: int, *args: str) -> subprocess.CompletedProcess:
    return run_mpi(ranks, ["-m", "exaforce.cli", *args], timeout=240)


def losses(run_dir: Path) -> dict[int, float]:
    """The global mean loss of each step (rank 0's perf log; a step recorded again: the later record)."""
    records = [json.loads(line) for line in (run_dir / "perf/rank-00000.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "step"}


def step_records(run_dir: Path, rank: int) -> list[dict]:
    lines = (run_dir / f"perf/rank-{rank:05d}.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "step"]


_runs: dict[str, Path] = {}


def straight(root: Path) -> Path:
    """4 uninterrupted steps with pp = 2 (once per module)."""
    if "straight" not in _runs:
        proc = exaforce(2, "train", "--config", str(config(root, "straight", pp=2)))
        assert proc.returncode == 0, proc.stderr[-3000:]
        _runs["straight"] = root / "straight"
    return _runs["straight"]


def stopped(root: Path) -> Path:
    """The same run stopped after step 2 (its step-2 checkpoint); a pristine copy each test copies again.
    4 steps stay inside the default 10 warm-up steps, so the learning rate does not depend on --steps."""
    if "stopped" not in _runs:
        proc = exaforce(2, "train", "--config", str(config(root, "stopped", pp=2)), "--steps", "2")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert checkpoint.latest(root / "stopped") == checkpoint.step_folder(root / "stopped", 2)
        shutil.copytree(root / "stopped", root / "stopped-pristine")
        _runs["stopped"] = root / "stopped-pristine"
    return _runs["stopped"]


def copy_of(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


@pytest.mark.slow
def test_stage_parts_and_a_resumed_run_equal_the_straight_run(root):
    """(a) Each stage writes its dense part and the COMPLETE marker records pp; 2 steps + resume for 2
    with pp = 2 give the straight run's losses, weights and optimizer state bit for bit (float64)."""
    reference = straight(root)
    folder = checkpoint.step_folder(reference, STEPS)
    marker = checkpoint.complete(folder)
    assert (marker["pp"], marker["world_size"]) == (2, 2)
    assert sorted(marker["files"]) == ["dense-pp0.pt", "dense-pp1.pt", "rng-rank00000.pt", "rng-rank00001.pt"]
    parts = [checkpoint.read(folder / f"dense-pp{s}.pt") for s in (0, 1)]
    buffers = {"reference_energy_HX", "energy_scale_H"}
    assert any(k.startswith("embedding.") for k in parts[0]["model"]) and not any(
        k.startswith(("blocks.1.", "readout.")) for k in parts[0]["model"])
    assert any(k.startswith("readout.") for k in parts[1]["model"]) and not any(
        k.startswith(("blocks.0.", "embedding.")) for k in parts[1]["model"])
    shared = parts[0]["model"].keys() & parts[1]["model"].keys()
    assert buffers <= shared and all(k.endswith(tuple(buffers) + ("freq_R",)) for k in shared), shared
    from exaforce.config import load
    from exaforce.model.potential import Potential

    whole = Potential(load(root / "straight.toml").model).state_dict()
    assert checkpoint.load(folder)["model"].keys() == whole.keys()  # the stage parts make the whole model
    for rank in (0, 1):  # validation through the pipeline, every stage's own FLOPs in its perf log
        records = step_records(reference, rank)
        assert [r["step"] for r in records if "val" in r] == [2, 4] and all(r["pp_stage"] == rank for r in records)
        assert records[-1]["val"]["default"]["structures"] == 4 and records[-1]["flops"] > 0
    assert step_records(reference, 0)[0]["flops"] != step_records(reference, 1)[0]["flops"]

    run_dir = copy_of(stopped(root), root / "resumed")
    proc = exaforce(2, "train", "--config", str(config(root, "resumed", pp=2)), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {checkpoint.step_folder(run_dir, 2)} at step 2" in proc.stdout
    got, want = losses(run_dir), losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1)) and got == want, (got, want)  # float64: bit for bit
    for s in (0, 1):  # every stage's weights and optimizer state
        mine, theirs = (checkpoint.read(checkpoint.step_folder(run, STEPS) / f"dense-pp{s}.pt")
                        for run in (run_dir, reference))
        assert all(torch.equal(mine["model"][k], v) for k, v in theirs["model"].items())
        for name, state in theirs["optimizer"].items():
            assert all(torch.equal(mine["optimizer"][name][k], v) for k, v in state.items() if torch.is_tensor(v)), name


def predictions(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from exaforce.io.bp import open_bp

    with open_bp(path) as dataset:
        frames = dataset.read(0, dataset.n_structures)
    return frames.energy_S, frames.forces_N3


@pytest.mark.slow
def test_a_pp2_checkpoint_continues_and_predicts_without_stages(root, tmp_path):
    """(b) The pp = 2 checkpoint of step 2 continues on one rank without stages (steps 3-4 as the
    pipeline ran them: only the order of sums differs, 1e-10; measured: equal); the step-4 checkpoint
    predicts on one rank (`exaforce predict`, the ASE calculator) what the pipeline restored from its
    stage parts predicts (1e-12 relative), and model info / export / --init-from read it whole."""
    reference = straight(root)
    run_dir = copy_of(stopped(root), root / "to-one-rank")
    proc = exaforce(1, "train", "--config", str(config(root, "to-one-rank", pp=1)), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pipeline stages 2 → 1 (stage parts merged)" in proc.stdout, proc.stdout[-2000:]
    got, want = losses(run_dir), losses(reference)
    assert sorted(got) == [1, 2, 3, 4]
    assert all(abs(got[s] - want[s]) <= 1e-10 * abs(want[s]) for s in got), (got, want)

    folder = checkpoint.step_folder(reference, STEPS)
    proc = exaforce(1, "predict", "--checkpoint", str(folder), "--data", str(root / "emt.bp"), "--out",
                    str(tmp_path / "p.bp"), "--dtype", "float64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    energy_S, forces_N3 = predictions(tmp_path / "p.bp")
    out = tmp_path / "pipeline.json"
    proc = run_mpi(2, [str(REPO / "tests/mpi/pp_checkpoint_ranks.py"), str(out), str(root / "straight.toml"),
                       str(folder), str(root / "emt.bp")], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipeline = json.loads(out.read_text())
    assert pipeline["stages"] == 2 and len(pipeline["energy"]) == len(energy_S) == 16
    np.testing.assert_allclose(energy_S, pipeline["energy"], rtol=1e-12, atol=0)
    np.testing.assert_allclose(forces_N3, pipeline["forces"], rtol=0, atol=1e-12 * np.abs(forces_N3).max())

    from exaforce.calculator import ExaforceCalculator
    from exaforce.io.bp import open_bp

    with open_bp(root / "emt.bp") as dataset:
        atoms = dataset.read(0, 1).to_atoms()[0]
    atoms.calc = ExaforceCalculator.from_checkpoint(folder)
    assert atoms.get_potential_energy() == pytest.approx(pipeline["energy"][0], rel=1e-12)

    info = exaforce(1, "model", "info", "--checkpoint", str(folder), "--json")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout.strip().splitlines()[-1])["step"] == STEPS
    export = exaforce(1, "model", "export", "--checkpoint", str(folder), "--out", str(tmp_path / "m.safetensors"))
    assert export.returncode == 0, export.stderr
    tuned = exaforce(1, "train", "--config", str(config(root, "tuned", pp=1)), "--init-from", str(folder),
                     "--steps", "1")
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert f"fine-tuning from {folder} (step {STEPS})" in tuned.stdout


def test_bad_layouts_and_a_missing_stage_part_are_one_line_errors(root, tmp_path):
    """(c) pp = 3 on 2 ranks, pp above model.blocks: exit 2, each rank says the same one line; a
    checkpoint without one of its stage parts: exit 2 naming the file."""
    cfg = config(root, "bad", pp=2)
    for extra, message in ((["--set", "parallel.pp=3", "--set", "model.blocks=4"],
                            "parallel.pp × parallel.gp × parallel.ep = 3 × 1 × 1 = 3 does not divide the world size 2"),
                           (["--set", "model.blocks=1"],
                            f"{cfg}: parallel.pp = 2: need 1 <= pp <= model.blocks (1): every stage runs at least "
                            "one interaction block")):
        proc = exaforce(2, "train", "--config", str(cfg), *extra)
        assert proc.returncode == 2, proc.stderr[-2000:]
        # Each rank says the same line; mpiexec may interleave the two ranks' writes, so count, not split.
        line = f"exaforce: error: {message}"
        assert proc.stderr.count(line) == 2 and not proc.stderr.replace(line, "").strip(), proc.stderr[-2000:]
        assert not (root / "bad").exists()

    broken = copy_of(stopped(root), tmp_path / "broken")
    folder = checkpoint.step_folder(broken, 2)
    (folder / "dense-pp1.pt").unlink()
    proc = exaforce(1, "predict", "--checkpoint", str(folder), "--data", str(root / "emt.bp"), "--out",
                    str(tmp_path / "p.bp"))
    assert proc.returncode == 2 and "dense-pp1.pt is missing" in proc.stderr, proc.stderr[-2000:]
    proc = exaforce(2, "train", "--config", str(config(root, "broken", pp=2, out_dir=str(broken))), "--resume",
                    str(folder))
    assert proc.returncode == 2 and "dense-pp1.pt is missing" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_stage_parts_split_and_merge_across_layouts(root):
    """(d) A pp = 1 checkpoint resumes with pp = 2 (its parts split per stage) as the pp = 2 run goes
    on; an MoE run with pp = 2 × ep = 2 on 4 ranks writes experts-pp{s}-ep{e}.pt and resumes on one
    rank without stages as the 4-rank run goes on (float64, 1e-10: only the order of sums differs)."""
    reference = straight(root)
    split = root / "split"
    proc = exaforce(1, "train", "--config", str(config(root, "split", pp=1)), "--steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = exaforce(2, "train", "--config", str(config(root, "split", pp=2)), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pipeline stages 1 → 2 (stage parts split)" in proc.stdout, proc.stdout[-2000:]
    got, want = losses(split), losses(reference)
    assert sorted(got) == [1, 2, 3, 4] and all(abs(got[s] - want[s]) <= 1e-10 * abs(want[s]) for s in got), (got, want)

    def moe_config(name: str, pp: int, ep: int) -> Path:
        path = config(root, name, pp=pp)
        text = path.read_text().replace('preset = "small"', 'preset = "small-moe"\nmoe_experts = 4')
        path.write_text(text + f"ep = {ep}\n")
        return path

    proc = exaforce(4, "train", "--config", str(moe_config("moe", pp=2, ep=2)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    marker = checkpoint.complete(checkpoint.step_folder(root / "moe", STEPS))
    assert {f"experts-pp{s}-ep{e}.pt" for s in (0, 1) for e in (0, 1)} <= marker["files"].keys(), marker["files"]
    merged = root / "moe-merged"
    proc = exaforce(4, "train", "--config", str(moe_config("moe-merged", pp=2, ep=2)), "--steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = exaforce(1, "train", "--config", str(moe_config("moe-merged", pp=1, ep=1)), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pipeline stages 2 → 1 (stage parts merged)" in proc.stdout and "experts re-sharded" in proc.stdout
    got, want = losses(merged), losses(root / "moe")
    assert sorted(got) == [1, 2, 3, 4] and all(abs(got[s] - want[s]) <= 1e-10 * abs(want[s]) for s in got), (got, want)


@pytest.mark.slow
def test_interleaved_stages_train_resume_exactly_and_change_layout(root):
    """(e) parallel.pp_chunks = 2 with 4 blocks on 2 ranks (rank 0 runs blocks 0 and 2, rank 1 blocks 1
    and 3): its parts hold those blocks; 2 steps + resume equal 4 straight steps bit for bit; its
    step-2 checkpoint goes on with contiguous stages (pp = 2, chunks = 1) and on one rank as the
    interleaved run goes on (float64, 1e-10: only the order of sums differs)."""
    def chunked(name: str, pp: int, chunks: int) -> Path:
        path = config(root, name, pp=pp)
        path.write_text(path.read_text().replace("blocks = 2", "blocks = 4") + f"pp_chunks = {chunks}\n")
        return path

    proc = exaforce(2, "train", "--config", str(chunked("chunked", 2, 2)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = checkpoint.step_folder(root / "chunked", STEPS)
    parts = [checkpoint.read(folder / f"dense-pp{s}.pt")["model"] for s in (0, 1)]
    held = [{int(k.split(".")[1]) for k in part if k.startswith("blocks.")} for part in parts]
    assert held == [{0, 2}, {1, 3}], held
    want = losses(root / "chunked")
    assert sorted(want) == [1, 2, 3, 4]

    proc = exaforce(2, "train", "--config", str(chunked("chunked-resumed", 2, 2)), "--steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pristine = copy_of(root / "chunked-resumed", root / "chunked-step2")
    proc = exaforce(2, "train", "--config", str(chunked("chunked-resumed", 2, 2)), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(root / "chunked-resumed") == want  # float64: bit for bit

    for name, ranks, pp, chunks in (("chunked-to-contiguous", 2, 2, 1), ("chunked-to-one", 1, 1, 1)):
        copy_of(pristine, root / name)
        proc = exaforce(ranks, "train", "--config", str(chunked(name, pp, chunks)), "--resume")
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = losses(root / name)
        assert sorted(got) == [1, 2, 3, 4] and all(abs(got[s] - want[s]) <= 1e-10 * abs(want[s]) for s in got), \
            (name, got, want)
