"""`exaforce model info` and `exaforce bench step` as a user runs them (sizes and output format only;
speed targets are shown by the benchmark itself, never by a timed test)."""

import json

import pytest

from conftest import run_cli

pytestmark = pytest.mark.cli


def test_base_preset_is_matris_10m_sized():
    proc = run_cli(["model", "info", "--preset", "base", "--json"])
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (info["width"], info["blocks"], info["cutoff"], info["three_body_cutoff"]) == (128, 10, 6.0, 4.0)
    assert abs(info["params"] - 10.4e6) / 10.4e6 < 0.10


def gated_mlp_params(in_dim: int, hidden: int, out_dim: int) -> int:
    return in_dim * 2 * hidden + 2 * hidden + hidden * out_dim + out_dim


def test_moe_1b_preset_has_a_billion_parameters_and_reports_active_ones():
    proc = run_cli(["model", "info", "--preset", "moe-1b", "--json"])
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    d, blocks, experts, k = info["width"], info["blocks"], info["experts"], info["top_k"]
    edge_expert = gated_mlp_params(3 * d, info["edge_mlp_ratio"] * d, d)
    node_expert = gated_mlp_params(3 * d, info["node_mlp_ratio"] * d, d)
    assert info["expert_params"] == blocks * experts * (edge_expert + node_expert)  # counted independently
    assert info["params"] == info["dense_params"] + info["expert_params"] >= 1.0e9
    assert info["active_params_per_atom"] == info["dense_params"] + blocks * k * (edge_expert + node_expert)


def test_unknown_preset_is_a_clear_error():
    proc = run_cli(["model", "info", "--preset", "huge"])
    assert proc.returncode == 2 and "model.preset = 'huge': unknown" in proc.stderr


def test_bench_step_json_line():
    proc = run_cli(["bench", "step", "--preset", "small", "--warmup", "1", "--repeats", "2", "--json"])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("atoms_per_s", "peak_mem_bytes", "flops_per_s", "peak_flops_per_s", "reference"):
        assert key in result
    assert result["atoms_per_s"] > 0 and result["flops_per_s"] > 0 and result["reference"] is None
