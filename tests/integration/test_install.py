"""A non-editable install renders jobs: templates and env files come with the package, not from a
checkout (run from another folder, with the wheel's exaforce first on the path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.jobs

RENDER = """
import sys
import exaforce
from exaforce.cli import main
print("exaforce from", exaforce.__file__, flush=True)
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The repository installed as a wheel would be (pip builds one), into a folder of its own. The
    build folder is a fresh one too: setuptools never empties REPO/build, whose leftovers would go
    into the wheel and could hide a file the package no longer ships."""
    target, build = tmp_path_factory.mktemp("site"), tmp_path_factory.mktemp("build")
    (build / "setup.cfg").write_text(f"[build]\nbuild_base = {build}\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, capture_output=True, timeout=300,
                   env=dict(os.environ, DIST_EXTRA_CONFIG=str(build / "setup.cfg")))
    return target


def render(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", RENDER, "jobs", "render", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_installed_package_renders_a_local_job(site, tmp_path):
    proc = render(site, tmp_path, "--machine", "local", "--config", str(REPO / "configs/demo.toml"), "--out", "job.sh")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"exaforce from {site / 'exaforce' / '__init__.py'}" in proc.stdout  # not the checkout's app/
    script = tmp_path / "job.sh"
    assert script.is_file()
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert f"export PATH={Path(sys.executable).parent}:" in script.read_text()  # the rendering interpreter's bin


def test_installed_package_ships_the_hpc_env_files(site, tmp_path):
    proc = render(site, tmp_path, "--machine", "frontier", "--account", "A", "--config",
                  str(REPO / "configs/demo.toml"), "--out", "job.sbatch")
    assert proc.returncode == 0, proc.stderr[-3000:]
    shipped = (site / "exaforce/jobscripts/envs/frontier/env.sh").resolve()
    assert shipped.read_text() == (REPO / "envs/frontier/env.sh").read_text()
    script = (tmp_path / "job.sbatch").read_text()
    assert f"source {shipped}\n" in script and f'export EXAFORCE_VENV="${{EXAFORCE_VENV:-{sys.prefix}}}"\n' in script
    subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")], check=True)
