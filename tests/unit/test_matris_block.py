"""The MatRIS-style block (model.block = "matris"): forces and stress are exact derivatives, the
energy is smooth as neighbours cross both cutoffs, and the double backward of force training reaches
every parameter (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

from conftest import predict_float64
from exaforce.config import Config, ConfigError, DataConfig, ModelConfig, validate
from exaforce.model.potential import Potential

pytestmark = pytest.mark.physics
predict = predict_float64
CFG = ModelConfig(width=16, blocks=2, elements=("Cu", "Au"), block="matris", cutoff=5.0, three_body_cutoff=3.2)


@pytest.fixture(scope="module")
def model() -> Potential:
    torch.manual_seed(1)
    return Potential(CFG).double()


def cell() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True)
    atoms.numbers[[1]] = 79
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + [[0.02, 0.01, 0], [0.01, -0.01, 0.015], [0, 0.015, 0.03]]),
                   scale_atoms=True)
    atoms.rattle(0.1, seed=3)
    return atoms


def test_forces_and_stress_are_derivatives_of_the_energy(model):
    atoms = cell()
    pred = predict(model, atoms)
    h = 1e-5
    for i, x in ((0, 0), (1, 2), (3, 1)):
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[i, x] += h
        minus.positions[i, x] -= h
        numeric = -(float(predict(model, plus).energy_G[0].detach()) - float(predict(model, minus).energy_G[0].detach())) / (2 * h)
        assert abs(numeric - float(pred.forces_N3[i, x])) < 1e-7
    eps = np.zeros((3, 3))
    eps[0, 1] = eps[1, 0] = h
    up, down = (atoms.copy() for _ in range(2))
    up.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
    down.set_cell(atoms.cell.array @ (np.eye(3) - eps), scale_atoms=True)
    numeric_xy = (float(predict(model, up).energy_G[0]) - float(predict(model, down).energy_G[0])) / (2 * h) \
        / 2 / atoms.get_volume()  # the xy and yx entries both moved
    assert abs(numeric_xy - float(pred.stress_G6[0, 5])) < 1e-8


@pytest.mark.parametrize("cutoff", [CFG.cutoff, CFG.three_body_cutoff], ids=["pair", "three-body"])
def test_energy_and_forces_are_continuous_across_each_cutoff(model, cutoff):
    """A trimer: atom 2 moves along x through `cutoff` from atom 0. Left and right of it, energy and
    forces differ by the curve's own slope (∝ δ, a tenth per decade of δ), never by a jump."""
    def energy_forces(r: float):
        atoms = Atoms("CuAuCu", positions=[[0, 0, 0], [0, 2.4, 0], [r, 0, 0]], cell=[30, 30, 30], pbc=False)
        pred = predict(model, atoms)
        return float(pred.energy_G[0].detach()), pred.forces_N3.detach().numpy()

    gaps = []
    for delta in (1e-2, 1e-3, 1e-4):
        (e_in, f_in), (e_out, f_out) = energy_forces(cutoff - delta), energy_forces(cutoff + delta)
        gaps.append((abs(e_in - e_out), np.abs(f_in - f_out).max()))
    for coarse, fine in zip(gaps, gaps[1:]):
        assert fine[0] < 0.2 * coarse[0] + 1e-13 and fine[1] < 0.2 * coarse[1] + 1e-12, gaps


def test_force_training_reaches_every_parameter(model):
    pred = predict(model, cell(), training=True)
    loss = pred.energy_G.pow(2).sum() + pred.forces_N3.pow(2).sum() + pred.stress_G6.pow(2).sum()
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    missing = [n for n, g in grads.items() if g is None and "head_embedding" not in n]
    assert not missing, missing
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    assert float(grads["triplet_embedding.weight"].abs().sum()) > 0  # the per-triplet state is trained


def test_matris_block_is_validated():
    data = DataConfig(train=("x.bp",))
    with pytest.raises(ConfigError, match="model.block = 'matrix': must be 'light' or 'matris'"):
        validate(Config(model=ModelConfig(block="matrix"), data=data))
    with pytest.raises(ConfigError, match="dense MLPs only"):
        validate(Config(model=ModelConfig(block="matris", moe_experts=4), data=data))


def test_a_checkpoint_written_before_model_block_existed_still_matches_its_config():
    """Resume compares the saved model config with the current one; a field the saved config lacks
    (model.block, added later) counts as its default, not as a difference."""
    import dataclasses

    from exaforce.checkpoint import model_config_differences

    current = dataclasses.asdict(ModelConfig())
    saved = {k: v for k, v in current.items() if k != "block"}
    assert model_config_differences(saved, current) == {}
    assert model_config_differences(saved, {**current, "block": "matris"}) == {"block": ("light", "matris")}


def test_receptive_field_counts_the_line_graph_reach():
    """One light block reaches a short bond's far end through the line graph (2 × 3.2 > 5 Å); the
    MatRIS block's bonds carry atom features, so its bound adds both per block."""
    from exaforce.model_io import receptive_field

    assert receptive_field(ModelConfig(blocks=2, cutoff=5.0, three_body_cutoff=3.2)) == pytest.approx(5.0 + 6.4)
    assert receptive_field(ModelConfig(blocks=3, cutoff=6.0, three_body_cutoff=2.0)) == pytest.approx(18.0)
    assert receptive_field(ModelConfig(blocks=2, cutoff=5.0, three_body_cutoff=3.2, block="matris")) == \
        pytest.approx(2 * 11.4)
