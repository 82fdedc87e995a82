"""Start-up calibration is cached (exaforce.training.calibrate): a second run of the same model,
path, dtype, layout and machine reuses the first's coefficients instead of twelve calibration steps;
anything else, a degenerate fit or `run.calibration_cache = ""` calibrates; a bad entry is ignored."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_emt_dataset, run_cli, small_run_config

pytestmark = pytest.mark.faults


def coefficients(run_dir) -> dict:
    folder = sorted((run_dir / "checkpoints").glob("step-*[0-9]"))[-1]
    progress = torch.load(folder / "dense.pt", weights_only=True)["meta"]["progress"]
    return {"flops": progress["flop_coefficients"], "cost": progress["cost_coefficients"]}


def train(root, name: str, *overrides: str):
    result = run_cli(["train", "--config", "run.toml", "--out-dir", name, *overrides], cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_a_second_run_reuses_the_calibration_and_a_changed_model_does_not(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    make_emt_dataset(tmp_path, 8)
    small_run_config(tmp_path, steps=2, log_every=1)
    first = train(tmp_path, "a")
    assert "s counting FLOPs" in first and "calibration: reused" not in first
    entries = list((tmp_path / "cache/exaforce/calibration").glob("*.json"))
    assert len(entries) == 1 and json.loads(entries[0].read_text())["key"]["model"]["width"] == 16

    second = train(tmp_path, "b")
    assert f"calibration: reused {entries[0]}" in second and "s counting FLOPs" not in second
    assert coefficients(tmp_path / "b") == coefficients(tmp_path / "a")

    wider = train(tmp_path, "c", "--set", "model.width=24")  # another model: its own entry
    assert "s counting FLOPs" in wider
    assert len(list((tmp_path / "cache/exaforce/calibration").glob("*.json"))) == 2
    off = train(tmp_path, "d", "--set", 'run.calibration_cache=""')
    assert "s counting FLOPs" in off

    entries[0].write_text("{ not json")  # a damaged entry: a warning, a new calibration, a rewritten entry
    damaged = train(tmp_path, "e")
    assert "calibration: WARNING: ignoring the unreadable cache entry" in damaged and "s counting FLOPs" in damaged
    assert json.loads(entries[0].read_text())["key"]["model"]["width"] == 16


def test_a_degenerate_calibration_is_never_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    make_emt_dataset(tmp_path, 2, seed=3)
    small_run_config(tmp_path, steps=1, log_every=1)
    assert "degenerate calibration" in train(tmp_path, "a")
    assert not list((tmp_path / "cache").rglob("*.json"))


def test_an_unwritable_cache_warns_and_the_run_goes_on(tmp_path):
    make_emt_dataset(tmp_path, 8)
    small_run_config(tmp_path, steps=1, log_every=1)
    (tmp_path / "blocked").write_text("a file where the cache folder would go")
    out = train(tmp_path, "a", "--set", f'run.calibration_cache="{tmp_path / "blocked" / "calibration"}"')
    assert "calibration: WARNING: could not write the cache entry" in out and "step     1/1" in out
