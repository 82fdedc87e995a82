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
