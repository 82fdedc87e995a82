"""Job templates and campaigns: renders pass bash -n and shellcheck and match each machine's facts."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from exaforce.jobs import AURORA_CPU_BIND, JOB_MACHINES, JobError, JobRequest, render_campaign, render_job
from exaforce.perf.machines import MACHINES

pytestmark = pytest.mark.jobs

CONFIG = """
[run]
out_dir = "runs/tiny"
steps = 4
[model]
preset = "small"
[data]
train = ["emt.bp"]
global_batch_size = 96
"""


@pytest.fixture()
def config(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(CONFIG)
    return path


def _render(machine: str, config: Path, nodes: int = 3, **kw) -> str:
    kw.setdefault("account", "ABC123" if JOB_MACHINES[machine].needs_account else "")
    return render_job(machine, JobRequest(config=config, nodes=nodes, walltime="02:00:00", **kw))


def _launch(script: str, marker: str) -> list[str]:
    """The launcher line that runs `exaforce <marker>`, split into words, $N and $((…)) evaluated."""
    nodes = int(re.search(r"^N=(\d+)$", script, re.M).group(1))
    line = next(line for line in script.splitlines() if f"exaforce {marker}" in line).rstrip(" \\&")
    line = re.sub(r"\$\(\((.*?)\)\)", lambda m: str(eval(m.group(1).replace("N", str(nodes)))), line)
    return shlex.split(line.replace('"$N"', str(nodes)).replace("$N", str(nodes)))


def _flag(words: list[str], *names: str) -> str:
    for i, word in enumerate(words):
        for name in names:
            if word == name:
                return words[i + 1]
            if word.startswith(name) and len(word) > len(name):
                return word[len(name):].lstrip("=")
    raise AssertionError(f"none of {names} in {words}")


def _device(script: str) -> str:
    """run.device the training is told to use."""
    return re.search(r"--set 'run\.device=\"(\w+)\"'", script).group(1)


def _world(script: str) -> int:
    """dp × ep the training is told to use (ep = 1 in these configs)."""
    return int(re.search(r"--set parallel\.dp=(\d+)", script).group(1))


@pytest.mark.parametrize("machine", sorted(JOB_MACHINES))
def test_every_render_passes_bash_n_and_shellcheck(machine, config, tmp_path):
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is missing: `make test` installs it (envs/local/install-slurm.sh)")
    script = tmp_path / f"{machine}.sh"
    script.write_text(_render(machine, config, nodes=1 if machine == "local" else 3, ranks_per_node=None))
    subprocess.run(["bash", "-n", str(script)], check=True)
    result = subprocess.run(["shellcheck", "--severity=info", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_env_scripts_pass_shellcheck():
    envs = sorted(Path(__file__).resolve().parents[2].glob("envs/*/*.sh"))
    assert len(envs) >= 8
    result = subprocess.run(["shellcheck", *map(str, envs)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_frontier_render_matches_the_machine(config):
    script = _render("frontier", config, nodes=3)
    assert "#SBATCH --nodes=3" in script and "#SBATCH --constraint=nvme" in script
    assert "#SBATCH --account=ABC123" in script and "#SBATCH --signal=B:USR1@120" in script
    words = _launch(script, "train")
    assert words[0] == "srun" and _flag(words, "-N") == "3"
    ranks = int(_flag(words, "-n"))
    assert ranks == 3 * MACHINES["frontier"].ranks_per_node == 24 == _world(script)
    assert _flag(words, "-c") == "7" and 8 * 7 <= JOB_MACHINES["frontier"].cores_per_node
    assert _flag(words, "--gpus-per-task") == "1" and _flag(words, "--gpu-bind") == "closest"
    # One GCD per task (Slurm sets ROCR_VISIBLE_DEVICES): each rank sees one device and takes it (ROCm is "cuda").
    assert _device(script) == "cuda"
    assert 'STAGE_DIR="/mnt/bb/$USER/exaforce-stage"' in script
    assert "NCCL_SOCKET_IFNAME" in (Path(__file__).resolve().parents[2] / "envs/frontier/env.sh").read_text()


def test_aurora_render_matches_the_machine(config):
    script = _render("aurora", config, nodes=2)
    assert "#PBS -l select=2" in script and "#PBS -l place=scatter" in script
    assert "#PBS -l walltime=02:00:00" in script and "#PBS -A ABC123" in script and "#PBS -q prod" in script
    assert "#PBS -l filesystems=" in script
    words = _launch(script, "train")
    assert words[0] == "mpiexec" and _flag(words, "--ppn") == "12"
    ranks = int(_flag(words, "-n"))
    assert ranks == 2 * MACHINES["aurora"].ranks_per_node == 24 == _world(script)
    cpu_list = _flag(words, "--cpu-bind")
    assert cpu_list == f"list:{AURORA_CPU_BIND}"
    cores = [set(range(int(a), int(b) + 1)) for a, b in (r.split("-") for r in cpu_list[5:].split(":"))]
    assert len(cores) == 12  # one core set per rank of the node
    assert sum(map(len, cores)) == len(set().union(*cores))  # distinct cores: no two ranks share one
    assert set().union(*cores) <= set(range(JOB_MACHINES["aurora"].cores_per_node)) - {0, 52}
    assert "ZE_AFFINITY_MASK" in script and "tile-bind.sh" in " ".join(words)
    assert 'export ZE_AFFINITY_MASK="$PALS_LOCAL_RANKID"' in script  # one stack visible per rank
    assert "ZE_FLAT_DEVICE_HIERARCHY=FLAT" in (Path(__file__).resolve().parents[2] / "envs/aurora/env.sh").read_text()
    assert _device(script) == "xpu"


def test_perlmutter_render_matches_the_machine(config):
    script = _render("perlmutter", config, nodes=4)
    assert "#SBATCH --constraint=gpu" in script and "#SBATCH --ntasks-per-node=4" in script
    assert "#SBATCH --gpus-per-node=4" in script and "#SBATCH --nodes=4" in script
    words = _launch(script, "train")
    ranks = int(_flag(words, "-n"))
    assert ranks == 4 * MACHINES["perlmutter"].ranks_per_node == 16 == _world(script)
    assert _flag(words, "--gpus-per-task") == "1"  # Slurm sets CUDA_VISIBLE_DEVICES per task: one GPU each
    assert _device(script) == "cuda"
    assert int(_flag(words, "-c")) * 4 <= 2 * JOB_MACHINES["perlmutter"].cores_per_node  # logical CPUs


def test_generic_slurm_and_local(config):
    script = _render("slurm", config, nodes=2, ranks_per_node=3)
    assert "#SBATCH --ntasks-per-node=3" in script and _world(script) == 6
    assert int(_flag(_launch(script, "train"), "-n")) == 6
    local = _render("local", config, nodes=1, ranks_per_node=2)
    assert _launch(local, "train")[:3] == ["mpiexec", "-n", "2"]
    assert _device(script) == _device(local) == "auto"  # whatever the nodes have


def test_a_config_that_names_its_device_keeps_it(config):
    config.write_text(CONFIG.replace('steps = 4', 'steps = 4\ndevice = "cpu"'))
    assert _device(_render("frontier", config)) == "cpu"


def test_bad_requests_fail_clearly(config):
    with pytest.raises(JobError, match="--account is required on frontier"):
        render_job("frontier", JobRequest(config=config))
    with pytest.raises(JobError, match="--walltime '2h'"):
        render_job("slurm", JobRequest(config=config, walltime="2h"))
    with pytest.raises(JobError, match="one rank per device, 8 per node"):
        _render("frontier", config, ranks_per_node=4)
    with pytest.raises(JobError, match="--machine 'summit'"):
        render_job("summit", JobRequest(config=config))


def test_campaigns_keep_the_global_or_the_per_rank_batch(config, tmp_path):
    strong = render_campaign("frontier", "strong", [1, 2, 4], JobRequest(config=config, account="A"), tmp_path / "s")
    manifest = json.loads((strong / "campaign.json").read_text())
    assert [p["global_batch"] for p in manifest["points"]] == [96, 96, 96]
    assert [p["ranks"] for p in manifest["points"]] == [8, 16, 32]
    weak = render_campaign("frontier", "weak", [1, 2, 4], JobRequest(config=config, account="A"), tmp_path / "w")
    manifest = json.loads((weak / "campaign.json").read_text())
    assert [p["global_batch"] for p in manifest["points"]] == [96, 192, 384]  # 12 per rank
    for p in manifest["points"]:
        job = (weak / p["job"]).read_text()
        assert f"data.global_batch_size={p['global_batch']}" in job and str(weak / p["run_dir"]) in job
        assert (weak / p["run_dir"]).is_dir()
    assert "sbatch --parsable" in (weak / "submit.sh").read_text()
    with pytest.raises(JobError, match="already holds a campaign"):
        render_campaign("frontier", "weak", [1], JobRequest(config=config, account="A"), tmp_path / "w")
    with pytest.raises(JobError, match="fewer structures than the largest point's 128 ranks"):
        render_campaign("frontier", "strong", [16], JobRequest(config=config, account="A"), tmp_path / "x")


def test_search_trials_are_a_seeded_space_filling_design():
    from exaforce.search import parse_param, sample_trials

    params = [parse_param("optim.lr=log:1e-4:1e-2"), parse_param("model.width=int:16:64"),
              parse_param("model.blocks=choice:1,2")]
    trials = sample_trials(params, 8, seed=3)
    assert trials == sample_trials(params, 8, seed=3) != sample_trials(params, 8, seed=4)
    lrs = sorted(np.log10([t["optim.lr"] for t in trials]))
    # Sobol: one point in each eighth of the log-lr range (random draws leave gaps and clusters)
    assert sorted(int((lr + 4) / 2 * 8) for lr in lrs) == list(range(8))
    assert {t["model.blocks"] for t in trials} == {1, 2} and all(16 <= t["model.width"] <= 64 for t in trials)
    assert all(isinstance(t["model.width"], int) for t in trials)


def test_search_parameters_parse_and_bad_ones_fail_clearly():
    from exaforce.search import Param, parse_param

    assert parse_param("optim.lr=log:1e-4:1e-2") == Param("optim.lr", "log", 1e-4, 1e-2)
    assert parse_param("model.width=int:16:64") == Param("model.width", "int", 16, 64)
    assert parse_param("model.blocks=choice:1,2,3").choices == (1, 2, 3)
    assert parse_param("run.recompute_bonds=choice:true,false").choices == (True, False)
    for bad, message in (("optim.lr", "expected SECTION.KEY=KIND:ARGS"), ("optim.lr=log:0:1", "need LOW < HIGH > 0"),
                         ("model.width=int:16.5:64", "(integers)"), ("optim.lr=gauss:1:2", "KIND must be"),
                         ("model.blocks=choice:2", "at least two values")):
        with pytest.raises(JobError, match=re.escape(message)):
            parse_param(bad)


@pytest.mark.slow
def test_a_local_search_of_8_trials_runs_end_to_end_and_its_report_ranks_them(tmp_path):
    """`jobs campaign --mode search` on this host: 8 trials (a scrambled Sobol design over lr and width), every job
    run by submit.sh, `perf report` ranks them by the validation force MAE."""
    from conftest import run_cli

    assert run_cli(["data", "synth", "--out", str(tmp_path / "emt.extxyz"), "--structures", "20"]).returncode == 0
    assert run_cli(["data", "convert", str(tmp_path / "emt.extxyz"), "--out", str(tmp_path / "emt.bp"),
                    "--name", "emt"]).returncode == 0
    config = tmp_path / "search.toml"
    config.write_text(f'[run]\nout_dir = "{tmp_path}/unused"\nsteps = 3\nfinal_checkpoint = false\n'
                      f'[model]\npreset = "small"\n[data]\nglobal_batch_size = 4\n'
                      f'[[data.datasets]]\npath = "{tmp_path}/emt.bp"\nval_fraction = 0.2\n')
    proc = run_cli(["jobs", "campaign", "--mode", "search", "--machine", "local", "--ranks-per-node", "1",
                    "--nodes", "1", "--config", str(config), "--out", str(tmp_path / "search"), "--trials", "8",
                    "--param", "optim.lr=log:1e-4:1e-2", "--param", "model.width=choice:8,16",
                    "--stage-dir", str(tmp_path / "stage")])
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "search/search.json").read_text())
    assert len(manifest["trials"]) == 8 and "Sobol" in manifest["sampler"]
    lrs = [t["params"]["optim.lr"] for t in manifest["trials"]]
    assert len(set(lrs)) == 8 and all(1e-4 <= lr <= 1e-2 for lr in lrs)
    assert {t["params"]["model.width"] for t in manifest["trials"]} == {8, 16}
    run = subprocess.run(["bash", str(tmp_path / "search/submit.sh")], capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    proc = run_cli(["perf", "report", str(tmp_path / "search")])
    assert proc.returncode == 0, proc.stderr
    assert "objective: validation force MAE" in proc.stdout
    assert [line.split()[0] for line in proc.stdout.splitlines()[1:9]] == [f"#{k}" for k in range(1, 9)]
    text = (tmp_path / "search/report/report.md").read_text()
    assert text.count("| t00") == 8 and "`optim.lr`" in text
