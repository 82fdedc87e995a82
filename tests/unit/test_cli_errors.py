"""Bad input to `convert` and `train`: one message naming file and frame, exit 2, nothing half-written."""

from __future__ import annotations

from pathlib import Path

import tempfile

import pytest
from ase.build import molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from conftest import run_cli, run_mpi
from exaforce.io.bp import write_bp
from exaforce.io.extxyz import write_extxyz
from exaforce.io.schema import Frames
from exaforce.io.synth import synthesize

pytestmark = pytest.mark.cli


@pytest.fixture(scope="module")
def good_frames() -> list[list[str]]:
    """Three valid extxyz frames, as lists of lines, to corrupt one at a time."""
    path = Path(tempfile.mkdtemp()) / "good.extxyz"
    write_extxyz(synthesize(3, seed=5), path)
    lines, frames, i = path.read_text().splitlines(), [], 0
    while i < len(lines):
        n = int(lines[i])
        frames.append(lines[i:i + n + 2])
        i += n + 2
    return frames


def write_frames(path: Path, frames: list[list[str]]) -> Path:
    path.write_text("\n".join(line for frame in frames for line in frame) + "\n")
    return path


def corrupt(frames, k: int, fix) -> list[list[str]]:
    out = [list(f) for f in frames]
    fix(out[k])
    return out


def drop_forces(frame: list[str]) -> None:
    frame[1] = frame[1].replace(":forces:R:3", "")
    frame[2:] = [" ".join(line.split()[:4]) for line in frame[2:]]


CASES = {
    "malformed": (1, lambda f: f.__setitem__(3, f[3].split()[0] + " 1.0 abc 2.0 0 0 0"), "frame 1"),
    "short-frame": (2, lambda f: f.__setitem__(0, str(int(f[0]) + 5)), "frame 2"),
    "no-forces": (1, drop_forces, "frame 1: field 'forces'"),
    "unknown-element": (2, lambda f: f.__setitem__(2, "Xq" + f[2][2:]), "frame 2: field 'species'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_convert_bad_extxyz(tmp_path, good_frames, case):
    frame, fix, where = CASES[case]
    src = write_frames(tmp_path / f"{case}.extxyz", corrupt(good_frames, frame, fix))
    proc = run_cli(["data", "convert", str(src), "--out", str(tmp_path / "out.bp"), "--name", "x"])
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"exaforce: error: {src}: {where}"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]  # no partial output


def test_convert_missing_file(tmp_path):
    proc = run_cli(["data", "convert", str(tmp_path / "nope.extxyz"), "--out", str(tmp_path / "o.bp"), "--name", "x"])
    assert proc.returncode == 2 and f"{tmp_path / 'nope.extxyz'}: no such file" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def train_config(tmp_path: Path, dataset: Path, extra: str = "") -> Path:
    path = tmp_path / "run.toml"
    path.write_text(f'[run]\nout_dir = "{tmp_path}/run"\nsteps = 2\n[data]\ntrain = ["{dataset}"]\n'
                    f'global_batch_size = 2\n[model]\nwidth = 8\nblocks = 1\n{extra}')
    return path


def molecules_with_metals(path: Path) -> Path:
    """A dataset whose structure 3 holds H, C, O: elements the default model does not know."""
    atoms = synthesize(3, seed=2)
    ethanol = molecule("CH3CH2OH", vacuum=4.0)
    ethanol.calc = EMT()
    ethanol.calc = SinglePointCalculator(ethanol, energy=ethanol.get_potential_energy(), forces=ethanol.get_forces())
    write_bp(Frames.from_atoms(atoms + [ethanol]), path, name="mixed")
    return path


@pytest.mark.parametrize("ranks", [1, 2])
def test_train_unknown_element_names_dataset_and_sample(tmp_path, ranks):
    dataset = molecules_with_metals(tmp_path / "mixed.bp")
    config = train_config(tmp_path, dataset)
    proc = run_mpi(ranks, ["-m", "exaforce.cli", "train", "--config", str(config)], timeout=120)
    assert proc.returncode != 0
    assert f"exaforce: error: {dataset}: frame 3: field 'numbers': element Z=6 is not in model.elements" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing written before the input is known good


def test_train_missing_dataset(tmp_path):
    config = train_config(tmp_path, tmp_path / "absent.bp")
    proc = run_cli(["train", "--config", str(config)])
    assert proc.returncode == 2 and f"{tmp_path / 'absent.bp'}" in proc.stderr and "no such dataset" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_train_bad_config_key(tmp_path):
    config = train_config(tmp_path, tmp_path / "absent.bp", extra="cutof = 5.0\n")
    proc = run_cli(["train", "--config", str(config)])
    assert proc.returncode == 2
    assert f"exaforce: error: {config}: model.cutof: unknown key" in proc.stderr


def test_train_on_a_missing_gpu_stops_every_rank_with_the_reason(tmp_path):
    """run.device = "cuda" on this machine (no GPU): exit 2 on both ranks, before anything is read or written."""
    config = train_config(tmp_path, tmp_path / "absent.bp")
    proc = run_mpi(2, ["-m", "exaforce.cli", "train", "--config", str(config), "--set", 'run.device="cuda"'],
                   timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "exaforce: error: rank 0 on" in proc.stderr and "run.device = 'cuda': this rank sees no cuda device" in proc.stderr
    assert "(and 1 more rank(s))" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_every_subcommand_has_help():
    for args in (["--help"], ["data", "--help"], ["data", "synth", "--help"], ["data", "convert", "--help"],
                 ["data", "inspect", "--help"],
                 ["stage", "--help"], ["train", "--help"], ["perf", "--help"], ["perf", "report", "--help"]):
        proc = run_cli(args)
        assert proc.returncode == 0 and "usage: exaforce" in proc.stdout, args
