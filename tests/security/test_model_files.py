"""Crafted model files: a checkpoint (folder or single file) carrying a pickled object whose
unpickling would run a command is refused with one line and exit 2 by every loader — `predict
--checkpoint` (folder and file), the ASE calculator, `train --init-from` and `train --resume` —
and the command never runs. No loader in the project unpickles a user's file."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import REPO, make_emt_dataset, run_cli, small_run_config
from exaforce.config import ConfigError

pytestmark = pytest.mark.security

CANARY = "PWNED"


class Payload:
    """Unpickling this calls os.system (what an attacker's file does)."""

    def __init__(self, canary: Path):
        self.command = f"touch {canary}"

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A real 2-step run of the small preset on a small EMT dataset (checkpoints at steps 1 and 2)."""
    root = tmp_path_factory.mktemp("trained")
    make_emt_dataset(root, 8)
    small_run_config(root, out_dir="run", steps=2, checkpoint_every=1, log_every=1)
    result = run_cli(["train", "--config", "run.toml"], cwd=root)
    assert result.returncode == 0, result.stderr
    return root


def _poison_folder(folder: Path, canary: Path) -> None:
    """dense.pt with a payload inside its meta; COMPLETE's sizes updated (anyone can edit them)."""
    state = torch.load(folder / "dense.pt", weights_only=True)
    state["meta"]["note"] = Payload(canary)
    torch.save(state, folder / "dense.pt")
    marker = json.loads((folder / "COMPLETE").read_text())
    marker["files"]["dense.pt"] = (folder / "dense.pt").stat().st_size
    (folder / "COMPLETE").write_text(json.dumps(marker))


def _poison_file(path: Path, canary: Path) -> None:
    state = torch.load(path, weights_only=True)
    state["config"]["note"] = Payload(canary)
    torch.save(state, path)


@pytest.fixture()
def attack(trained, tmp_path) -> dict[str, Path]:
    """A copy of the trained run whose every model file carries the payload."""
    root = tmp_path / "attack"
    shutil.copytree(trained, root)
    canary = tmp_path / CANARY
    for folder in (root / "run" / "checkpoints").glob("step-*[0-9]"):
        _poison_folder(folder, canary)
    export = next((root / "run" / "checkpoints").glob("step-*.pt"))
    _poison_file(export, canary)
    return {"root": root, "canary": canary, "export": export,
            "folder": sorted(p for p in (root / "run" / "checkpoints").glob("step-*[0-9]"))[-1]}


def _refused(result, attack: dict[str, Path]) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("exaforce: error")]
    assert len(errors) == 1 and "refused" in errors[0] and "Traceback" not in result.stderr, result.stderr
    assert not attack["canary"].exists(), "the payload ran"


@pytest.mark.parametrize("which", ["folder", "export", "run"])
def test_predict_refuses_a_crafted_model(attack, which):
    checkpoint = attack["root"] / "run" if which == "run" else attack[which]
    _refused(run_cli(["predict", "--checkpoint", str(checkpoint), "--data", "emt.bp", "--out", "pred.bp"],
                     cwd=attack["root"]), attack)
    assert not (attack["root"] / "pred.bp").exists()


def test_calculator_refuses_a_crafted_model(attack):
    from exaforce.calculator import ExaforceCalculator

    for path in (attack["folder"], attack["export"]):
        with pytest.raises(ConfigError, match="refused: it holds Python objects"):
            ExaforceCalculator.from_checkpoint(path)
    assert not attack["canary"].exists()


def test_train_init_from_refuses_a_crafted_model(attack):
    _refused(run_cli(["train", "--config", "run.toml", "--out-dir", "finetune", "--init-from", str(attack["export"])],
                     cwd=attack["root"]), attack)


def test_train_resume_refuses_a_crafted_checkpoint(attack):
    _refused(run_cli(["train", "--config", "run.toml", "--set", "run.steps=3", "--resume"], cwd=attack["root"]), attack)


def test_the_payload_runs_without_weights_only(attack):
    """The attack is real: an unrestricted unpickler runs it (so the tests above can fail)."""
    torch.load(attack["export"], weights_only=False)
    assert attack["canary"].exists()


def test_no_loader_unpickles_a_users_file():
    pattern = re.compile(r"weights_only\s*=\s*False|pickle\.loads?\(|allow_pickle\s*=\s*True|torch\.load\((?![^)]*weights_only=True)")
    offenders = [f"{path.relative_to(REPO)}:{n}: {line.strip()}"
                 for folder in ("app", "io", "perf") for path in sorted((REPO / folder).rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders
