"""The loss's force term: each structure alike (mean over its atoms) or each atom alike
(loss.forces_per_atoms = N: sum over its atoms / N); optim.amsgrad reaches AdamW."""

import numpy as np
import pytest
import torch
from ase.build import bulk

from exaforce.config import LossConfig, ModelConfig
from exaforce.graph import batch_from_atoms
from exaforce.loss import structure_losses
from exaforce.model.potential import Prediction


def two_cells():
    """A 4-atom and a 32-atom Cu cell whose predicted forces are off by 1 eV/Å on every component."""
    cells = [bulk("Cu", "fcc", a=3.6, cubic=True), bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)]
    batch = batch_from_atoms(cells, np.arange(120), 5.0, 3.2)
    pred = Prediction(batch.energy_G.clone(), batch.forces_N3 + 1.0, torch.full((2, 6), float("nan")))
    return batch, pred


def test_forces_count_each_structure_alike_by_default():
    batch, pred = two_cells()
    forces_G = structure_losses(pred, batch, LossConfig())["forces"]
    assert forces_G.tolist() == pytest.approx([1.0, 1.0])  # the mean over each cell's atoms


def test_forces_per_atoms_counts_each_atom_alike():
    batch, pred = two_cells()
    forces_G = structure_losses(pred, batch, LossConfig(forces_per_atoms=18.0))["forces"]
    assert forces_G.tolist() == pytest.approx([4 / 18, 32 / 18])  # 8x the weight for the 8x larger cell
    assert forces_G.sum().item() == pytest.approx(2.0)  # N = the mean atoms per structure keeps the total


def test_forces_per_atoms_is_validated():
    from exaforce.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match=r"loss.forces_per_atoms = -1.0: must be >= 0"):
        from_dict({"data": {"train": ["x.bp"]}, "loss": {"forces_per_atoms": -1}})


def test_amsgrad_reaches_the_optimizer():
    from exaforce.config import from_dict
    from exaforce.model.potential import Potential
    from exaforce.training.schedule import make_optimizer

    for flag in (False, True):
        cfg = from_dict({"data": {"train": ["x.bp"]}, "model": {"preset": "demo"}, "optim": {"amsgrad": flag}})
        optimizer, _ = make_optimizer(Potential(cfg.model), cfg)
        assert optimizer.defaults["amsgrad"] is flag
