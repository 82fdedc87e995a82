"""Dynamic expert placement (parallel.replace_experts_every): experts and their optimizer state move
between EP ranks at step boundaries to balance the measured load, the busiest get replicas in spare
slots (parallel.expert_replicas: their rows split among the holders, their gradients summed), the
experts stay on the host with one resident per layer (parallel.resident_experts), and no number
changes. Float64 training of an MoE model for 20 steps with re-placement and replicas after every
step and the offload budget equals the run with the fixed, resident placement: every step's loss
terms (energies, forces, stresses through the loss) on every rank, and the final weights of every
(logical) expert."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli, run_mpi

pytestmark = [pytest.mark.mpi, pytest.mark.equivalence]

STEPS = 20


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("placement")
    assert run_cli(["data", "synth", "--out", str(root / "m.extxyz"), "--structures", "16", "--seed", "3"]).returncode == 0
    assert run_cli(["data", "convert", str(root / "m.extxyz"), "--out", str(root / "m.bp"), "--name", "m"]).returncode == 0
    return root


def train(root, ranks: int, ep: int, every: int, replicas: int = 0, resident: int = 0) -> tuple[str, list[list[dict]]]:
    run_dir = root / f"run-{ranks}-{ep}-{every}"
    config = root / f"run-{ranks}-{ep}-{every}.toml"
    config.write_text(f"""
[run]
out_dir = "{run_dir}"
steps = {STEPS}
dtype = "float64"
log_every = 1
[data]
train = ["{root / 'm.bp'}"]
global_batch_size = {2 * ranks}
[model]
preset = "small-moe"
moe_experts = 8
[parallel]
ep = {ep}
replace_experts_every = {every}
expert_replicas = {replicas}
resident_experts = {resident}
""")
    proc = run_mpi(ranks, ["-m", "exaforce.cli", "train", "--config", str(config)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [[json.loads(line) for line in (run_dir / f"perf/rank-{r:05d}.jsonl").read_text().splitlines()
              if '"kind":"step"' in line] for r in range(ranks)]
    return proc.stdout, steps


@pytest.mark.parametrize("ranks, ep", [(2, 2), pytest.param(4, 4, marks=pytest.mark.slow),
                                       pytest.param(4, 2, marks=pytest.mark.slow)], ids=["ep2", "ep4", "dp2-ep2"])
def test_replacing_replicating_and_offloading_experts_changes_no_number(dataset, ranks, ep):
    import torch

    from exaforce import checkpoint

    log, moving = train(dataset, ranks, ep, every=1, replicas=1, resident=1)
    _, fixed = train(dataset, ranks, ep, every=0)
    assert log.count("expert copies moved") >= STEPS // 2  # experts really travel
    assert f"; {4 * ep} replica(s);" in log  # four MoE layers (two per block), one spare slot per EP rank
    for record in (r for rank in moving for r in rank):  # one expert on the device at a time, per layer
        assert 0 < record["offload_peak_resident_experts"] <= 1.0 and record["offload_fetched_bytes"] > 0
    for rank_moving, rank_fixed in zip(moving, fixed):
        assert len(rank_moving) == len(rank_fixed) == STEPS
        for a, b in zip(rank_moving, rank_fixed):
            for term, value in b["loss_sum"].items():
                assert a["loss_sum"][term] == pytest.approx(value, rel=1e-12, abs=1e-300), (a["step"], term)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-12)
    final = [checkpoint.load(dataset / f"run-{ranks}-{ep}-{every}/checkpoints/step-{STEPS:08d}")["model"] for every in (1, 0)]
    assert final[0].keys() == final[1].keys() and any(".experts.7." in k for k in final[0])
    for key, value in final[1].items():
        assert torch.allclose(final[0][key], value, rtol=1e-12, atol=1e-14 * float(value.abs().max())), key
