"""Element-routed MoE MLP: dropless top-k + shared expert, position-independent routing, conservative forces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress

from exaforce.calculator import ExaforceCalculator
from exaforce.model.moe import MoEMLP, load_balancing_loss
from exaforce.model.routing import ATOMS, DispatchClock, contiguous_placement, plan_layer

pytestmark = pytest.mark.physics


def local_route(moe: MoEMLP, species: torch.Tensor):
    counts_Z = np.bincount(species.numpy(), minlength=moe.router.element_embedding.num_embeddings)
    return plan_layer(moe.router.top_k_table().numpy(), counts_Z[None], counts_Z, 0, moe.placement)


def test_every_token_gets_its_elements_top_k_experts_plus_shared():
    torch.manual_seed(0)
    moe = MoEMLP(6, 8, 5, n_elements=3, n_experts=4, top_k=2, token_kind=ATOMS).double()
    x = torch.randn(11, 6, dtype=torch.float64)
    species = torch.tensor([0, 1, 2, 2, 1, 0, 0, 2, 1, 1, 0])
    expert_ZK = moe.router.top_k_table()
    weight_ZK = moe.router.probabilities().gather(1, expert_ZK)
    weight_ZK = weight_ZK / weight_ZK.sum(-1, keepdim=True)
    expected = torch.stack([
        moe.shared(x[t]) + sum(weight_ZK[species[t], k] * moe.experts[str(int(expert_ZK[species[t], k]))](x[t])
                               for k in range(2))
        for t in range(len(x))])
    torch.testing.assert_close(moe(x, species, local_route(moe, species), DispatchClock()), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("top_k", [1, 2])
def test_the_task_loss_trains_the_router(top_k: int):
    """With top_k = 1 the chosen expert's weight is its router probability, not 1 (which would
    leave the router without a gradient from anything but the load-balancing loss)."""
    torch.manual_seed(0)
    moe = MoEMLP(6, 8, 5, n_elements=3, n_experts=4, top_k=top_k, token_kind=ATOMS).double()
    x = torch.randn(11, 6, dtype=torch.float64)
    species = torch.tensor([0, 1, 2, 2, 1, 0, 0, 2, 1, 1, 0])
    moe(x, species, local_route(moe, species), DispatchClock()).pow(2).sum().backward()
    for name, p in moe.router.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 1e-6, f"router {name}: no gradient with top_k = {top_k}"


def test_an_expert_shard_starts_with_the_single_rank_weights():
    def build(ep_rank: int, ep_size: int) -> MoEMLP:
        torch.manual_seed(4)
        return MoEMLP(6, 8, 5, n_elements=3, n_experts=4, top_k=2, token_kind=ATOMS, ep_rank=ep_rank, ep_size=ep_size)

    full = build(0, 1).state_dict()
    shards = [build(r, 2).state_dict() for r in range(2)]
    assert set(shards[0]) & {k for k in shards[1] if ".experts." in k} == set()
    for shard in shards:
        for key, value in shard.items():
            torch.testing.assert_close(value, full[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="not divisible by parallel.ep = 3"):
        build(0, 3)


def test_split_sizes_follow_from_element_counts_and_top_k_table():
    # 3 elements, 4 experts on 2 EP ranks (experts 0,1 | 2,3), top-2.
    table_ZK = np.array([[0, 2], [3, 1], [2, 3]])
    counts_RZ = np.array([[2, 1, 0],   # rank 0: pairs → e0: 2, e1: 1, e2: 2, e3: 1
                          [0, 0, 4]])  # rank 1: pairs → e2: 4, e3: 4; nothing for rank 0 (zero split)
    r0 = plan_layer(table_ZK, counts_RZ, counts_RZ.sum(0), 0, contiguous_placement(4, 2))
    r1 = plan_layer(table_ZK, counts_RZ, counts_RZ.sum(0), 1, contiguous_placement(4, 2))
    assert r0.send_splits == (3, 3) and r0.recv_splits == (3, 0) and r0.expert_rows == (2, 1)
    assert r1.send_splits == (0, 8) and r1.recv_splits == (3, 8) and r1.expert_rows == (6, 5)
    # Rank 1 receives [e2 e2 e3 | e2 e2 e2 e2 e3 e3 e3 e3]; expert order takes e2 rows first, sources in order.
    assert r1.to_expert_order.tolist() == [0, 1, 3, 4, 5, 6, 2, 7, 8, 9, 10]
    assert r1.to_expert_order[r1.to_receive_order].tolist() == list(range(11))
    assert r0.world_load_X.tolist() == [2, 1, 6, 5]


def test_aux_loss_is_x_times_sum_f_p():
    probs = torch.softmax(torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 2.0, 0.0]], dtype=torch.float64), -1)
    expert_ZK = probs.topk(1, dim=-1).indices
    tokens_Z = torch.tensor([2, 3])
    share = torch.tensor([2 / 5, 3 / 5], dtype=torch.float64)
    assert expert_ZK.reshape(-1).tolist() == [2, 2]  # f = (0, 0, 1, 0)
    assert float(load_balancing_loss(probs, expert_ZK, tokens_Z)) == pytest.approx(
        4 * float(share @ probs[:, 2]), rel=1e-12)


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


def test_energy_is_continuous_along_a_path_and_forces_match_finite_differences():
    """One atom of an 8-atom cell moves 2.4 Å through 121 configurations (neighbours enter and leave both cutoffs):
    each step's energy change equals the trapezoid integral of −F·u (a routing jump would break
    it), and −dE/ds by central differences equals F·u at every point."""
    calc = ExaforceCalculator.from_preset("small-moe", seed=7, dtype="float64", elements=("Cu", "Au", "Ni"))
    atoms = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 2))
    atoms.numbers[[2, 7]] = 79
    atoms.numbers[5] = 28
    atoms.rattle(0.05, seed=2)
    atoms.calc = calc
    u = np.array([1.0, 0.6, 0.3]) / np.linalg.norm([1.0, 0.6, 0.3])
    start, h, eps = atoms.positions[0].copy(), 0.02, 1e-5

    def at(s: float) -> tuple[float, float]:
        atoms.positions[0] = start + s * u
        return atoms.get_potential_energy(), float(atoms.get_forces()[0] @ u)

    path = [at(i * h) for i in range(121)]
    energies, along = np.array([e for e, _ in path]), np.array([f for _, f in path])
    assert np.ptp(energies) > 1e-3  # the path does change the energy
    trapezoid = -h * 0.5 * (along[1:] + along[:-1])
    np.testing.assert_allclose(np.diff(energies), trapezoid, atol=2e-6)
    for i in range(0, 121, 10):
        central = -(at(i * h + eps)[0] - at(i * h - eps)[0]) / (2 * eps)
        assert central == pytest.approx(along[i], abs=1e-8)
