"""Hostile job values: nothing a user passes to `jobs render` / `jobs campaign` is executed by the
rendered script. Values on scheduler directive lines (which cannot be quoted) are refused unless
they match their type; values in the script body are shell-quoted, pass shellcheck, and a rendered
local job run for real executes none of them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from exaforce.jobs import JOB_MACHINES, JobError, JobRequest, render_campaign, render_job

pytestmark = [pytest.mark.security, pytest.mark.jobs]

CANARY = "PWNED"
HOSTILE = [f"x\ntouch {CANARY}", f"$(touch {CANARY})", f"`touch {CANARY}`", f"x;touch {CANARY}", "x'y", 'x"y',
           "x y", "x\\", "x&&y", "x|y", "x>y"]
CONFIG = '[run]\nout_dir = "run"\nsteps = 1\n[model]\npreset = "small"\n[data]\ntrain = ["missing.bp"]\n' \
         'global_batch_size = 2\n'


@pytest.fixture()
def config(tmp_path) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(CONFIG)
    return path


def _request(machine: str, config: Path, **kw) -> JobRequest:
    kw.setdefault("account", "ABC123" if JOB_MACHINES[machine].needs_account else "")
    return JobRequest(config=config, **kw)


@pytest.mark.parametrize("machine", sorted(JOB_MACHINES))
@pytest.mark.parametrize("field", ["account", "partition", "job_name", "run_dir", "filesystems"])
def test_hostile_directive_values_are_refused(machine, field, config, tmp_path):
    option = {"run_dir": "--run-dir", "filesystems": "filesystems"}.get(field, "--" + field.replace("_", "-"))
    for value in HOSTILE:
        hostile = tmp_path / value if field == "run_dir" else value
        with pytest.raises(JobError, match=f"^{option}.*directive line"):
            render_job(machine, _request(machine, config, **{field: hostile}))
        # A campaign's points run under its --out folder.
        camp = tmp_path / value if field == "run_dir" else tmp_path / "camp"
        request = _request(machine, config, **({} if field == "run_dir" else {field: hostile}))
        with pytest.raises(JobError, match=f"^{option}.*directive line"):
            render_campaign(machine, "weak", [1], request, camp, batch_per_rank=1)
        assert not camp.exists()


def test_hostile_walltime_is_refused(config):
    for value in ("01:00:00\ntouch PWNED", "١:00:00", "1:00:00 ", "1:0:00"):
        with pytest.raises(JobError, match="--walltime"):
            render_job("slurm", _request("slurm", config, walltime=value))


def _hostile_body(tmp_path: Path) -> dict:
    """Values that go into the script body: a stage folder and --set overrides full of shell syntax."""
    return {"stage_dir": str(tmp_path / f"stage $(touch {CANARY}) `touch {CANARY}`;touch {CANARY}\n'\""),
            "overrides": (f"run.out_dir=x;touch {CANARY}", f"run.init_from=$(touch {CANARY})",
                          f"run.init_from=`touch {CANARY}`\n touch {CANARY}")}


@pytest.mark.parametrize("machine", sorted(JOB_MACHINES))
def test_hostile_body_values_are_quoted_and_pass_shellcheck(machine, config, tmp_path):
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is missing: `make test` installs it (envs/local/install-slurm.sh)")
    script = tmp_path / "job.sh"
    script.write_text(render_job(machine, _request(machine, config, run_dir=tmp_path / "run", **_hostile_body(tmp_path))))
    subprocess.run(["bash", "-n", str(script)], check=True)
    result = subprocess.run(["shellcheck", "--severity=info", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_a_rendered_local_job_executes_no_value(config, tmp_path):
    """The real job: bash runs it, exaforce stage and train start for real (train then stops: the
    config's dataset does not exist) — and no canary file appears anywhere."""
    work = tmp_path / "work"
    work.mkdir()
    script = work / "job.sh"
    script.write_text(render_job("local", _request("local", config, run_dir=work / "run", **_hostile_body(work))))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(script)], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert "exaforce: error" in result.stderr and "exaforce job:" in result.stdout, result.stdout + result.stderr
    assert result.returncode == 2, result.stdout + result.stderr
    assert not list(tmp_path.rglob(f"*{CANARY}*")) or all(CANARY in str(p.parent) for p in tmp_path.rglob(CANARY)), \
        list(tmp_path.rglob(f"*{CANARY}*"))
    assert not (work / CANARY).exists() and not (tmp_path / CANARY).exists()
