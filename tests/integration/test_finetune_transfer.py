"""Fine-tuning through the real CLI: pretrain on EMT cells of Al/Cu/Ag/Au (one head), then train on
cells holding Ni/Pd/Pt with a new head — from the checkpoint and from scratch, same seed, same
steps — and read both validation force MAEs; a frozen backbone stays bit-identical; a model that
does not fit the checkpoint is refused."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli, run_mpi

pytestmark = [pytest.mark.inference, pytest.mark.mpi, pytest.mark.slow]
SPLIT = {"Ni", "Pd", "Pt"}
STEPS = 40


def write_config(path: Path, out: Path, data: Path, heads: list[str], head: str, steps: int,
                 extra: str = "", model: str = "") -> Path:
    path.write_text(f"""
[run]
out_dir = "{out}"
steps = {steps}
log_every = 100
seed = 1
{extra}
[data]
global_batch_size = 8
[[data.datasets]]
path = "{data}"
head = "{head}"
val_fraction = 0.2
[model]
preset = "small"
heads = {heads!r}
{model}
[loss]
stress_weight = 0.1
""".replace("'", '"'))
    return path


def force_mae(stdout: str, head: str) -> float:
    found = re.findall(rf"validation {head}: .* forces MAE ([0-9.]+) meV/Å", stdout)
    assert found, stdout[-2000:]
    return float(found[-1])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    from exaforce.io.bp import write_bp
    from exaforce.io.schema import Frames
    from exaforce.io.synth import synthesize

    tmp = tmp_path_factory.mktemp("finetune")
    atoms = synthesize(260, seed=3)
    new = [a for a in atoms if SPLIT & set(a.get_chemical_symbols())]
    old = [a for a in atoms if not SPLIT & set(a.get_chemical_symbols())]
    write_bp(Frames.from_atoms(old), tmp / "old.bp", "old", method="EMT")
    write_bp(Frames.from_atoms(new[:80]), tmp / "new.bp", "new", method="EMT")
    config = write_config(tmp / "pre.toml", tmp / "pre", tmp / "old.bp", ["old"], "old", 150)
    proc = run_mpi(2, ["-m", "exaforce.cli", "train", "--config", str(config)], timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


def test_fine_tuned_beats_scratch_at_equal_steps(pretrained):
    tmp = pretrained
    maes = {}
    for name, extra in (("scratch", ""), ("tuned", f'init_from = "{tmp / "pre"}"')):
        config = write_config(tmp / f"{name}.toml", tmp / name, tmp / "new.bp", ["old", "new"], "new", STEPS, extra)
        proc = run_mpi(2, ["-m", "exaforce.cli", "train", "--config", str(config)], timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        maes[name] = force_mae(proc.stdout, "new")
    assert "fine-tuning from" in proc.stdout and "heads ['old'] kept, new ['new']" in proc.stdout
    print(f"validation force MAE after {STEPS} steps: fine-tuned {maes['tuned']:.1f}, "
          f"from scratch {maes['scratch']:.1f} meV/Å")
    assert maes["tuned"] < 0.9 * maes["scratch"], maes


def test_frozen_backbone_stays_bit_identical(pretrained):
    """--init-from/--freeze on the command line; only readout and head embeddings move."""
    from exaforce.finetune import TRAINABLE_WITH_FROZEN_BACKBONE
    from exaforce.model_io import load_trained

    tmp = pretrained
    config = write_config(tmp / "frozen.toml", tmp / "frozen", tmp / "new.bp", ["old", "new"], "new", 10)
    proc = run_mpi(2, ["-m", "exaforce.cli", "train", "--config", str(config), "--init-from", str(tmp / "pre"),
                       "--freeze", "backbone"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "backbone frozen" in proc.stdout
    before, after = load_trained(tmp / "pre"), load_trained(tmp / "frozen")
    moved = []
    for key, value in after.state.items():
        if key in before.state and not TRAINABLE_WITH_FROZEN_BACKBONE.search(key) and key not in (
                "reference_energy_HX", "energy_scale_H"):
            assert np.array_equal(value.numpy(), before.state[key].numpy()), key
        elif key.startswith("readout") and not np.array_equal(value.numpy(), before.state[key].numpy()):
            moved.append(key)
    assert "readout.down.weight" in moved
    for folder in (p for p in (tmp / "pre/checkpoints").iterdir() if p.is_dir()):  # sharded checkpoint folders
        from_folder = load_trained(folder)
        if from_folder.step == before.step:
            assert all(np.array_equal(v.numpy(), before.state[k].numpy()) for k, v in from_folder.state.items())


def test_model_that_does_not_fit_the_checkpoint_is_refused(pretrained):
    tmp = pretrained
    config = write_config(tmp / "wide.toml", tmp / "wide", tmp / "new.bp", ["old", "new"], "new", 5,
                          f'init_from = "{tmp / "pre"}"', model="width = 24")
    proc = run_cli(["train", "--config", str(config)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.width = 24 (the checkpoint's: 16)" in proc.stderr
    config = write_config(tmp / "drop.toml", tmp / "drop", tmp / "new.bp", ["new"], "new", 5,
                          f'init_from = "{tmp / "pre"}"')
    proc = run_cli(["train", "--config", str(config)])
    assert proc.returncode == 2 and "must keep the checkpoint's heads ['old']" in proc.stderr
