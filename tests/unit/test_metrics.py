"""RUN/metrics.csv and the log line's rates (exaforce.training.metrics)."""

from __future__ import annotations

import csv

import pytest

from exaforce.training.metrics import MetricsFile, StepClock, metrics_columns


def test_metrics_file_rows_validation_columns_and_append_on_resume(tmp_path):
    first = MetricsFile(tmp_path, ("pbe", "r2scan"))
    first.row({"step": 1, "loss": 2.5, "lr": 1e-3})
    first.row({"step": 2, "loss": 1.5}, val={"r2scan": {"energy_mev_per_atom": 12.0, "forces_mev_per_a": 80.0}})
    first.row({"step": 3, "loss": 9.9})  # after the last checkpoint (step 2): taken again on resume
    first.close()
    resumed = MetricsFile(tmp_path, ("pbe", "r2scan"), resumed_at=2)  # rows through step 2 kept, one header
    resumed.row({"step": 3, "loss": 1.0})
    resumed.close()
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert list(rows[0]) == metrics_columns(("pbe", "r2scan"))
    assert [(r["step"], r["loss"]) for r in rows] == [("1", "2.5"), ("2", "1.5"), ("3", "1")]
    assert rows[0]["lr"] == "0.001"
    assert rows[1]["val_r2scan_forces_mev_per_a"] == "80" and rows[1]["val_pbe_forces_mev_per_a"] == ""
    assert MetricsFile(tmp_path, ("pbe",)).path.read_text().count("\n") == 1  # a new run starts over


def test_step_clock_eta_is_capped_by_the_time_budget():
    clock = StepClock(start=0.0)
    clock.tick(100)
    assert "ETA" in clock.summary(steps_left=10, budget_left_s=None)
    assert clock.summary(steps_left=10**9, budget_left_s=61.0).endswith("ETA 0:01:01")


def test_progress_report_prints_plain_lines_in_job_logs_and_nothing_when_disabled():
    import io

    from exaforce.console import ProgressReport

    ticks = iter(range(10**6))
    clock = lambda: float(next(ticks))  # noqa: E731 — one second per call: 100 structures in ~100 s
    log = io.StringIO()  # not a terminal: periodic plain lines, the last one at 100 %
    with ProgressReport("predict", stream=log, clock=clock) as progress:
        for done in range(1, 101):
            progress(done, 100)
    lines = log.getvalue().splitlines()
    assert 5 <= len(lines) <= 11 and lines[-1].startswith("  predict: 100/100 structures (100 %)") and "ETA 0 s" in lines[-1]
    short = io.StringIO()  # work done within QUIET_FOR_S: no lines (the command prints its summary)
    with ProgressReport("predict", stream=short) as progress:
        for done in range(1, 101):
            progress(done, 100)
    assert short.getvalue() == ""
    quiet = io.StringIO()
    with ProgressReport("predict", enabled=False, stream=quiet) as progress:  # the other ranks
        progress(1, 1)
    assert quiet.getvalue() == ""


def test_tensorboard_scalars_mirror_the_metrics_file_and_a_resume_purges_later_steps(tmp_path):
    """run.tensorboard: the same values as TensorBoard scalars (read back with TensorBoard's own reader);
    a resume from step 2 drops the interrupted segment's steps 3-4 and appends."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def write(metrics: MetricsFile, steps) -> None:
        for step in steps:
            metrics.row({"step": step, "epoch": 0, "lr": 1e-3 * step, "loss": 10.0 / step, "loss_forces": 5.0 / step,
                         "atoms_per_s": 100.0}, {"pbe": {"energy_mev_per_atom": 7.0, "forces_mev_per_a": 40.0 + step}}
                        if step % 2 == 0 else None)
        metrics.close()

    write(MetricsFile(tmp_path, ("pbe",), tensorboard=True), range(1, 5))
    write(MetricsFile(tmp_path, ("pbe",), resumed_at=2, tensorboard=True), range(3, 6))
    board = EventAccumulator(str(tmp_path / "tensorboard"))
    board.Reload()
    scalars = board.Tags()["scalars"]
    assert {"loss/total", "loss/forces", "lr", "atoms_per_s", "val/pbe/forces_mev_per_a",
            "val/pbe/energy_mev_per_atom"} <= set(scalars)
    loss = [(e.step, e.value) for e in board.Scalars("loss/total")]
    assert [s for s, _ in loss] == [1, 2, 3, 4, 5] and loss[2][1] == pytest.approx(10.0 / 3)
    assert [(e.step, e.value) for e in board.Scalars("val/pbe/forces_mev_per_a")] == [(2, 42.0), (4, 44.0)]


def test_tensorboard_without_the_package_is_a_config_error(monkeypatch):
    import importlib.util

    from exaforce import config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(config.ConfigError, match="run.tensorboard = true: the tensorboard package is not installed"):
        config.validate(config.Config(run=config.RunConfig(tensorboard=True)))
