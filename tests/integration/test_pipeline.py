"""The main job end to end through the real CLI: synth → convert → stage (2 ranks) → train (2 ranks) → report."""

import csv
import json
import re

import pytest
import torch

from conftest import REPO, run_cli, run_mpi

pytestmark = [pytest.mark.mpi, pytest.mark.cli]


def test_demo_pipeline_small(tmp_path):
    """The demo's three fidelities (EMT metals, GFN2-xTB and GFN1-xTB molecules), small."""
    for name, extra in (("emt", []), ("gfn2", ["--source", "molecules", "--method", "GFN2-xTB"]),
                        ("gfn1", ["--source", "molecules", "--method", "GFN1-xTB"])):
        proc = run_cli(["data", "synth", "--out", str(tmp_path / f"{name}.extxyz"), "--structures", "24", *extra])
        assert proc.returncode == 0, proc.stderr
        proc = run_cli(["data", "convert", str(tmp_path / f"{name}.extxyz"), "--out", str(tmp_path / f"{name}.bp"),
                        "--name", name])
        assert proc.returncode == 0, proc.stderr
    proc = run_mpi(2, ["-m", "exaforce.cli", "stage", *(str(tmp_path / f"{n}.bp") for n in ("emt", "gfn2", "gfn1")),
                       "--to", str(tmp_path / "nvme")])
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "nvme" / "gfn1.bp").is_dir()
    config = (REPO / "configs/demo.toml").read_text()
    config = config.replace('path = "../demo/', f'path = "{tmp_path}/nvme/')
    config = config.replace('out_dir = "../demo/run"', f'out_dir = "{tmp_path}/run"')
    (tmp_path / "train.toml").write_text(config)
    proc = run_mpi(2, ["-m", "exaforce.cli", "train", "--config", str(tmp_path / "train.toml"), "--steps", "4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "topology: world=2" in proc.stdout
    table = proc.stdout.split("topology: world=2")[1].splitlines()[1:4]
    assert table[0].split()[-1] == "device" and [row.split()[-1] for row in table[1:]] == ["cpu", "cpu"]
    for head in ("emt", "gfn2", "gfn1"):  # the held-out 10% of each fidelity, after the last step
        assert f"validation {head}: energy MAE" in proc.stdout, proc.stdout[-2000:]
    logs = sorted((tmp_path / "run/perf").glob("rank-*.jsonl"))
    assert [p.name for p in logs] == ["rank-00000.jsonl", "rank-00001.jsonl"]
    records = [json.loads(line) for line in logs[1].read_text().splitlines()]
    assert [r["kind"] for r in records] == ["header"] + ["step"] * 4 + ["end"]
    assert records[0]["machine"]["torch_device"] == "cpu" and "device_peak_mem_bytes" not in records[1]
    assert re.search(r"step +4/4  loss \S+  \d+ ms  \S+ steps/s  [\d,]+ atoms/s  ETA 0:00:00", proc.stdout)
    metrics = list(csv.DictReader((tmp_path / "run/metrics.csv").open()))  # rank 0: the global learning curve
    assert [int(r["step"]) for r in metrics] == [1, 2, 3, 4]
    assert float(metrics[0]["loss"]) == pytest.approx(json.loads(logs[0].read_text().splitlines()[1])["loss"])
    for head in ("emt", "gfn2", "gfn1"):  # validated at the last step only
        assert metrics[-1][f"val_{head}_forces_mev_per_a"] and not metrics[0][f"val_{head}_forces_mev_per_a"]
    assert records[1]["flops"] > 0 and records[1]["times"]["force_backward"] > 0
    state = torch.load(tmp_path / "run/checkpoints/step-00000004.pt", weights_only=False)
    assert state["step"] == 4 and "model" in state
    proc = run_cli(["perf", "report", str(tmp_path / "run")])
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "run/report/report.md").read_text()
    assert "atoms/s" in report and "FLOP/s" in report
    assert (tmp_path / "run/report/loss_curve.png").stat().st_size > 10_000


def test_expert_parallel_training_through_the_cli(tmp_path):
    """2 ranks, ep=2: the topology table, the perf log's MoE fields, and a checkpoint holding every expert."""
    assert run_cli(["data", "synth", "--out", str(tmp_path / "m.extxyz"), "--structures", "16"]).returncode == 0
    assert run_cli(["data", "convert", str(tmp_path / "m.extxyz"), "--out", str(tmp_path / "m.bp"),
                    "--name", "m"]).returncode == 0
    (tmp_path / "ep.toml").write_text(f"""
[run]
out_dir = "{tmp_path}/run"
steps = 3
[data]
train = ["{tmp_path}/m.bp"]
global_batch_size = 4
[model]
preset = "small-moe"
[parallel]
ep = 2
""")
    proc = run_mpi(2, ["-m", "exaforce.cli", "train", "--config", str(tmp_path / "ep.toml")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dp=1 pp=1 gp=1 ep=2" in proc.stdout and "peak memory per rank" in proc.stdout
    for rank in (0, 1):
        steps = [json.loads(line) for line in (tmp_path / f"run/perf/rank-0000{rank}.jsonl").read_text().splitlines()
                 if '"kind":"step"' in line]
        assert len(steps) == 3
        assert all(s["times"]["alltoall"] > 0 and s["moe_aux"] > 0 for s in steps)
        load = steps[0]["expert_load"]
        assert len(load["max_over_mean"]) == len(load["experts"]) == len(load["ep_rank_rows"]) == 4  # 2 blocks × 2 MoE MLPs
        assert len(load["alltoall_bytes"]) == 2 and load["rank_rows"] > 0 and load["expert_seconds"] > 0
    proc = run_cli(["perf", "report", str(tmp_path / "run")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "run/report/report.md").read_text()
    assert "## Expert load (MoE, steady state)" in report and "MiB to EP rank 1" in report
    assert (tmp_path / "run/report/expert_load.png").is_file()
    from exaforce.calculator import ExaforceCalculator

    calc = ExaforceCalculator.from_checkpoint(tmp_path / "run/checkpoints/step-00000003.pt")
    assert [sorted(layer.experts) for layer in calc.model.moe_layers] == [["0", "1", "2", "3"]] * 4
