"""Element-routed MoE MLP: dropless top-k + shared expert, position-independent routing, conservative forces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress

from exaforce.calculator import ExaforceCalculator
from exaforce.model.moe import MoEMLP

pytestmark = pytest.mark.physics


def test_every_token_gets_its_elements_top_k_experts_plus_shared():
    torch.manual_seed(0)
    moe = MoEMLP(6, 8, 5, n_elements=3, n_experts=4, top_k=2).double()
    x = torch.randn(11, 6, dtype=torch.float64)
    species = torch.tensor([0, 1, 2, 2, 1, 0, 0, 2, 1, 1, 0])
    expert_ZK, weight_ZK, _ = moe.router()
    expected = torch.stack([
        moe.shared(x[t]) + sum(weight_ZK[species[t], k] * moe.experts[int(expert_ZK[species[t], k])](x[t])
                               for k in range(2))
        for t in range(len(x))])
    torch.testing.assert_close(moe(x, species), expected, rtol=1e-12, atol=1e-12)


def test_aux_loss_is_x_times_sum_f_p():
    moe = MoEMLP(4, 4, 4, n_elements=2, n_experts=4, top_k=1).double()
    with torch.no_grad():  # both elements prefer expert 2 (logits 0, 0, 0.5·dim, 0)
        moe.router.element_embedding.weight.fill_(1.0)
        moe.router.logits.weight.zero_()
        moe.router.logits.weight[2] = 0.5
    species = torch.tensor([0, 0, 1, 1, 1])
    moe(torch.randn(5, 4, dtype=torch.float64), species)
    _, _, probs = moe.router()
    share = torch.tensor([2 / 5, 3 / 5], dtype=torch.float64)
    assert int(moe.router()[0][0, 0]) == 2 and int(moe.router()[0][1, 0]) == 2
    assert float(moe.aux_loss.detach()) == pytest.approx(4 * float((share @ probs[:, 2]).detach()), rel=1e-12)


def test_moe_forces_and_stress_are_exact_derivatives():
    calc = ExaforceCalculator.from_preset("small-moe", seed=3, dtype="float64", elements=("Cu", "Au", "Ni"))
    atoms = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 2))
    atoms.numbers[[1, 6]] = 79
    atoms.numbers[4] = 28
    atoms.rattle(0.06, seed=5)
    atoms.calc = calc
    forces = atoms.get_forces()
    assert np.abs(forces).max() > 1e-4
    np.testing.assert_allclose(forces, calculate_numerical_forces(atoms, eps=1e-5), atol=1e-8)  # eV/Å
    np.testing.assert_allclose(atoms.get_stress(), calculate_numerical_stress(atoms, eps=1e-6), atol=1e-9)
