"""Graph parallelism's decomposition, in one process: the halo subgraphs of a partition give energies,
∂E/∂r, ∂E/∂ε and the double-backward parameter gradient that sum to the whole graph's (float64), for
triclinic cells, a slab, a molecule and a part that owns no atom. The MPI path (the Allreduce, the
trainer, the per-block halo exchange's numbers) is tests/mpi/test_gp_equivalence.py; here the exchange's
plan is checked to hold what each block reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111

from exaforce.config import LossConfig, ModelConfig
from exaforce.graph import batch_from_atoms
from exaforce.loss import structure_losses
from exaforce.model.potential import Potential, energy_forces_stress, prediction
from exaforce.parallel.graph_parallel import assign_owners, domain_owners, exchange_shard, halo, shard
from exaforce.parallel.graph_parallel import GraphParallel
from exaforce.parallel.topology import Topology

ELEMENTS = ("Cu", "Au", "Ni")
MODELS = {
    "light": ModelConfig(width=8, blocks=3, elements=ELEMENTS, cutoff=4.0, three_body_cutoff=3.0),
    "matris": ModelConfig(width=8, blocks=2, elements=ELEMENTS, block="matris", cutoff=4.0, three_body_cutoff=3.0),
    "moe": ModelConfig(width=8, blocks=2, elements=ELEMENTS, cutoff=4.0, three_body_cutoff=3.0, moe_experts=4,
                       moe_top_k=2),
}
WEIGHTS = {"atoms": 1.0, "edges": 0.02, "angles": 0.002}


def structures() -> list[Atoms]:
    rng = np.random.default_rng(4)
    triclinic = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((3, 2, 2))
    triclinic.numbers[rng.choice(len(triclinic), 12, replace=False)] = 79
    triclinic.set_cell(triclinic.cell.array @ np.array([[1, 0.12, 0.05], [0, 1, 0.1], [0, 0, 1]]), scale_atoms=True)
    triclinic.rattle(0.08, seed=1)
    slab = fcc111("Ni", size=(3, 3, 3), vacuum=5.0, periodic=True)  # pbc (T, T, T): set the vacuum axis open
    slab.pbc = (True, True, False)
    slab.numbers[::4] = 29
    slab.rattle(0.05, seed=2)
    cluster = Atoms("Cu2Au", positions=[[0, 0, 0], [2.4, 0, 0], [1.2, 2.0, 0.3]])
    return [triclinic, slab, cluster]


def model_of(kind: str) -> Potential:
    torch.manual_seed(3)
    model = Potential(MODELS[kind]).double()
    with torch.no_grad():
        model.energy_scale_H.fill_(0.7)
        model.reference_energy_HX.normal_()
        for p in model.parameters():  # away from the initial symmetries
            p.add_(0.05 * torch.randn_like(p))
    return model


def batch_of(model: Potential, atoms_list: list[Atoms]):
    cfg = model.cfg
    batch = batch_from_atoms(atoms_list, model.species_table(), cfg.cutoff, cfg.three_body_cutoff)
    rng = np.random.default_rng(0)
    batch.energy_G = torch.from_numpy(rng.normal(size=batch.n_graphs) * 5)
    batch.forces_N3 = torch.from_numpy(rng.normal(size=tuple(batch.forces_N3.shape)))
    batch.stress_G6 = torch.from_numpy(rng.normal(size=(batch.n_graphs, 6)) * 0.01)
    return batch.to("cpu", torch.float64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.nan_to_num(a.detach()), torch.nan_to_num(b.detach())
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("kind", ["light", "matris", "moe"])
@pytest.mark.parametrize("parts, min_atoms", [(2, 0), (3, 0), (4, 0), (4, 20)])
def test_halo_shards_sum_to_the_whole_graph(kind, parts, min_atoms):
    """Σ over parts of (E_k, ∂E_k/∂r, ∂E_k/∂ε) is the single-graph prediction, and the parts' surrogate
    backwards (the adjoints of a force/stress/energy loss) sum to the loss's parameter gradient."""
    model = model_of(kind)
    batch = batch_of(model, structures())
    loss_cfg = LossConfig()
    whole = energy_forces_stress(model, batch, training=True)
    model.zero_grad()
    structure_losses(whole, batch, loss_cfg)["total"].sum().backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    owner_N = assign_owners(batch, parts, min_atoms, WEIGHTS)
    assert set(np.unique(owner_N)) <= set(range(parts))
    gp = GraphParallel(Topology.single_process(), len(model.blocks), len(ELEMENTS), min_atoms, WEIGHTS)
    pieces = [shard(batch, owner_N, k, len(model.blocks), len(ELEMENTS)) for k in range(parts)]
    assert sum(len(p.owned_n) for p in pieces) == batch.numbers_N.shape[0]
    outputs = [gp._energy_and_gradients(model, p, None, None, True, {}) for p in pieces]
    energy_G = sum(o[0] for o in outputs)
    grad_pos_N3 = torch.zeros_like(batch.positions_N3)
    for p, o in zip(pieces, outputs):
        grad_pos_N3 = grad_pos_N3.index_add(0, p.atoms_n, o[1])
    grad_strain_G33 = sum(o[2] for o in outputs)
    summed = prediction(energy_G, grad_pos_N3, grad_strain_G33, batch)
    assert rel(summed.energy_G, whole.energy_G) < 1e-12
    assert rel(summed.forces_N3, whole.forces_N3) < 1e-12
    assert rel(summed.stress_G6, whole.stress_G6) < 1e-12

    # Adjoints from the assembled prediction, each part's share back-propagated through its own subgraph.
    leaves = [t.detach().requires_grad_(True) for t in (energy_G, grad_pos_N3, grad_strain_G33)]
    loss = structure_losses(prediction(*leaves, batch), batch, loss_cfg)["total"].sum()
    adjoint_G, adjoint_N3, adjoint_G33 = torch.autograd.grad(loss, leaves)
    for p, (e_G, g_n3, s_G33) in zip(pieces, outputs):
        ((adjoint_G * e_G).sum() + (adjoint_N3[p.atoms_n] * g_n3).sum() + (adjoint_G33 * s_G33).sum()).backward()
    for name, grad in reference.items():
        got = dict(model.named_parameters())[name].grad
        assert got is not None and rel(got, grad) < 1e-10, name


def test_a_part_may_own_no_atom():
    """Three atoms over four parts: one part owns nothing, runs an empty subgraph, and adds zeros."""
    model = model_of("light")
    batch = batch_of(model, structures()[2:])
    owner_N = assign_owners(batch, 4, 0, WEIGHTS)
    empty = next(k for k in range(4) if not (owner_N == k).any())
    piece = shard(batch, owner_N, empty, len(model.blocks), len(ELEMENTS))
    assert piece.local.numbers_N.shape[0] == 0 and piece.local.edge_index_2E.shape[1] == 0
    gp = GraphParallel(Topology.single_process(), len(model.blocks), len(ELEMENTS), 0, WEIGHTS)
    energy_G, grad_pos, grad_strain = gp._energy_and_gradients(model, piece, None, None, True, {})
    assert float(energy_G.detach().abs().sum()) == 0.0 and grad_pos.shape == (0, 3)
    assert float(grad_strain.detach().abs().sum()) == 0.0


def test_domains_are_balanced_deterministic_and_spatial():
    """Equal-cost domains (within one atom's cost), the same partition every time, and contiguous:
    a domain of a bisected cubic cell is a slab of it."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((4, 2, 2))  # long along x
    cost = np.ones(len(atoms))
    owner = domain_owners(atoms.positions, atoms.cell.array, True, cost, 4)
    assert np.bincount(owner).tolist() == [16, 16, 16, 16]
    assert np.array_equal(owner, domain_owners(atoms.positions, atoms.cell.array, True, cost, 4))
    x = atoms.get_scaled_positions()[:, 0]
    for k in range(4):  # bisected twice along x, the widest extent
        assert x[owner == k].max() - x[owner == k].min() < 0.25
    weighted = domain_owners(atoms.positions, atoms.cell.array, True, np.where(x < 0.5, 3.0, 1.0), 2)
    assert abs(np.bincount(weighted, np.where(x < 0.5, 3.0, 1.0))[0] - 64) <= 3


def test_halo_holds_what_the_receptive_field_reaches():
    """Bonds of a chain: with B blocks an owned atom's energy reads atoms B bonds away, and no farther."""
    n = 12
    src = np.r_[np.arange(n - 1), np.arange(1, n)]
    dst = np.r_[np.arange(1, n), np.arange(n - 1)]
    no_triplets = np.zeros((2, 0), np.int64)
    owned = np.zeros(n, bool)
    owned[0] = True
    for blocks in (1, 2, 3):
        atoms, bonds, _ = halo(owned, np.stack([src, dst]), no_triplets, blocks)
        assert np.flatnonzero(atoms).tolist() == list(range(blocks + 1))


@pytest.mark.parametrize("parts", [2, 3, 4])
def test_exchange_plan_is_one_hop_and_matches_across_ranks(parts):
    """Per rank: the owned atoms' bonds with all their triplets, the bonds from other domains ending on
    owned atoms and those bonds' far ends — one hop, far less than the ghosts' closure; and what rank a
    sends rank b is, row for row, what b overwrites with what it receives from a."""
    model = model_of("light")
    rod = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 8))
    rod.rattle(0.05, seed=5)
    batch = batch_of(model, [rod, *structures()])
    src_E, dst_E = batch.edge_index_2E.numpy()
    a_T = batch.triplet_index_2T[0].numpy()
    owner_N = assign_owners(batch, parts, 0, WEIGHTS)
    pieces = [exchange_shard(batch, owner_N, k, parts, len(ELEMENTS)) for k in range(parts)]
    ghosts = [shard(batch, owner_N, k, len(model.blocks), len(ELEMENTS)) for k in range(parts)]
    global_bonds = []
    for k, p in enumerate(pieces):
        atoms_n = p.atoms_n.numpy()
        local_src, local_dst = p.local.edge_index_2E.numpy()
        bonds_e = np.flatnonzero((owner_N[src_E] == k) | (owner_N[dst_E] == k))
        global_bonds.append(bonds_e)
        assert np.array_equal(atoms_n[local_src], src_E[bonds_e]) and np.array_equal(atoms_n[local_dst], dst_E[bonds_e])
        assert p.local.triplet_index_2T.shape[1] == int((owner_N[src_E[a_T]] == k).sum())  # every owned bond's triplets
        assert set(atoms_n) == set(np.flatnonzero(owner_N == k)) | set(src_E[bonds_e]) | set(dst_E[bonds_e])
        assert p.local.edge_index_2E.shape[1] <= ghosts[k].local.edge_index_2E.shape[1]
    assert sum(p.local.edge_index_2E.shape[1] for p in pieces) < sum(g.local.edge_index_2E.shape[1] for g in ghosts)
    for a in range(parts):
        for b in range(parts):
            pa, pb = pieces[a].halo, pieces[b].halo
            sent = np.split(pieces[a].atoms_n[pa.atom_send_n].numpy(), np.cumsum(pa.atom_send_splits)[:-1])[b]
            overwritten = np.split(pieces[b].atoms_n[pb.atom_recv_n].numpy(), np.cumsum(pb.atom_recv_splits)[:-1])[a]
            assert np.array_equal(sent, overwritten) and (owner_N[sent] == a).all()
            assert (a != b) or len(sent) == 0
            sent = np.split(global_bonds[a][pa.bond_send_e.numpy()], np.cumsum(pa.bond_send_splits)[:-1])[b]
            overwritten = np.split(global_bonds[b][pb.bond_recv_e.numpy()], np.cumsum(pb.bond_recv_splits)[:-1])[a]
            assert np.array_equal(sent, overwritten) and (owner_N[src_E[sent]] == a).all()
            assert (owner_N[dst_E[sent]] == b).all()
        halo_bonds = np.flatnonzero((owner_N[dst_E] == a) & (owner_N[src_E] != a))  # each overwritten once
        assert sorted(global_bonds[a][pieces[a].halo.bond_recv_e.numpy()]) == halo_bonds.tolist()
        atoms_n = pieces[a].atoms_n.numpy()  # every local atom not owned is overwritten, once
        assert sorted(atoms_n[pieces[a].halo.atom_recv_n.numpy()]) == sorted(set(atoms_n) - set(np.flatnonzero(owner_N == a)))
