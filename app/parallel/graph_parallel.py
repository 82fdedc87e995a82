"""Graph (domain) parallelism: the atoms of one structure split over a GP group, exact to the
second derivative.

Each rank owns a spatial domain of each large structure (recursive coordinate bisection of the
periodic, possibly triclinic cell, balanced by the calibrated FLOPs per atom, bond and triplet) and computes
the energy of its owned atoms only, E = Σ_k E_k, on a subgraph of the structure's graph: its atoms and
a halo. Two kinds of halo (parallel.gp_halo):

- "ghost" (`shard`): ghost atoms out to the model's receptive field, a closure over the graph itself,
  block by block from the readout back (`halo`), so the subgraph holds exactly the atoms, bonds and
  triplets whose features reach an owned atom's energy — periodic images included, since a ghost is
  the same atom the single-rank graph has (the bonds carry the cell shifts). Each E_k is then a
  function of rank k's subgraph alone: no collective inside the model or its backwards. The price
  is redundant work: with B blocks, cutoff r_c and three-body cutoff r_3, bonds within about
  (B − 1)·r_c + r_3 of a domain's surface are computed on both sides.
- "exchange" (`exchange_shard`, `HaloExchange`): one hop of halo — the bonds that end on owned atoms
  and their far ends — whose features are overwritten with their owners' after each block's bond
  update and before each block's atoms are read: two differentiable all-to-alls per block in the
  forward, and as many again in each backward (the force backward and the loss's double backward
  run through them, recorded, so the derivatives stay exact). Little redundant work, at any number
  of blocks; the light block only (the matris block's bond update reads its end atoms and triplet
  states, which would need a third exchange).

Either way one host Allreduce per micro-batch of (E_k, ∂E_k/∂r, ∂E_k/∂ε) gives every rank the
structure's prediction (with the exchange, rank k's gradients are the part of ∂E/∂r that flows
back through its own ops to its own copies of the atoms; they still sum to the whole). The loss and
its adjoints (∂L/∂E, ∂L/∂F, ∂L/∂σ) are computed from those sums on every GP rank alike, and each
rank back-propagates them through its own force graph (the double backward) and forward graph; the
ranks' parameter gradients add up in the data-parallel reduction (a sum over the stage group,
divided by the number of replicas, which does not count GP ranks). `exaforce bench gp` measures
both halos on the same cell (README: which is used when).

Structures below parallel.gp_min_atoms go whole to one GP rank (the least loaded), so a share of
many small structures is dealt over the group, and a rank may own no atom at all.

Shapes: N atoms, E bonds, T triplets, G structures, n/e/t this rank's subgraph, C routing classes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from exaforce.comm.alltoall import all_to_all
from exaforce.comm.groups import Group, MPIGroup, gpu_aware_mpi
from exaforce.config import LossConfig
from exaforce.graph import GraphBatch, route_class_counts
from exaforce.loss import structure_losses
from exaforce.model.potential import (Potential, Prediction, energy, inference_plan, local_routing, prediction,
                                      strained_geometry)
from exaforce.model.recompute import Recompute
from exaforce.model.routing import DispatchClock, Routing
from exaforce.parallel.topology import Topology

Weights = dict[str, float]  # cost per atom, edge and angle (the trainer: the calibrated FLOP coefficients)


def atom_costs(batch: GraphBatch, weights: Weights) -> np.ndarray:
    """Predicted cost of each atom: itself, the bonds it starts and the triplets centred on it."""
    n = batch.numbers_N.shape[0]
    src_E = batch.edge_index_2E[0].cpu().numpy()
    centre_T = src_E[batch.triplet_index_2T[0].cpu().numpy()]
    return (weights["atoms"] + weights["edges"] * np.bincount(src_E, minlength=n)
            + weights["angles"] * np.bincount(centre_T, minlength=n))


def domain_owners(positions_N3: np.ndarray, cell_33: np.ndarray, periodic: bool, cost_N: np.ndarray,
                  parts: int) -> np.ndarray:
    """Part index of each atom: recursive coordinate bisection into `parts` domains of equal cost.

    Periodic cells are cut along lattice planes (fractional coordinates scaled by the plane spacing,
    so a triclinic cell is cut across its widest extent); molecules along Cartesian axes. Ties are
    broken by atom index, so the partition is a function of the structure alone."""
    if periodic:
        fractional = np.linalg.solve(cell_33.T, positions_N3.T).T
        fractional -= np.floor(fractional)
        volume = abs(np.linalg.det(cell_33))
        spacing_3 = np.array([volume / np.linalg.norm(np.cross(cell_33[(k + 1) % 3], cell_33[(k + 2) % 3]))
                              for k in range(3)])
        coords_N3 = fractional * spacing_3
    else:
        coords_N3 = positions_N3
    owner_N = np.zeros(len(positions_N3), np.int64)
    _bisect(np.arange(len(positions_N3)), coords_N3, cost_N, 0, parts, owner_N)
    return owner_N


def _bisect(atoms: np.ndarray, coords_N3: np.ndarray, cost_N: np.ndarray, first: int, parts: int,
            owner_N: np.ndarray) -> None:
    if parts == 1 or len(atoms) == 0:
        owner_N[atoms] = first
        return
    extent = coords_N3[atoms].max(0) - coords_N3[atoms].min(0)
    axis = int(np.argmax(extent))
    order = atoms[np.lexsort((atoms, coords_N3[atoms, axis]))]
    left_parts = parts // 2
    cumulative = np.cumsum(cost_N[order])
    target = cumulative[-1] * left_parts / parts
    cut = int(np.argmin(np.abs(cumulative - target))) + 1  # atoms on the left
    _bisect(order[:cut], coords_N3, cost_N, first, left_parts, owner_N)
    _bisect(order[cut:], coords_N3, cost_N, first + left_parts, parts - left_parts, owner_N)


def assign_owners(batch: GraphBatch, parts: int, min_atoms: int, weights: Weights) -> np.ndarray:
    """Owner (GP index) of every atom of the batch: structures of at least `min_atoms` atoms split into
    domains; smaller ones whole, each to the rank with the least cost so far (largest first)."""
    cost_N = atom_costs(batch, weights)
    owner_N = np.zeros(len(cost_N), np.int64)
    load = np.zeros(parts)
    natoms_G = batch.natoms_G.cpu().numpy()
    offsets = np.r_[0, np.cumsum(natoms_G)]
    cost_G = np.add.reduceat(cost_N, offsets[:-1]) if len(cost_N) else np.zeros(len(natoms_G))
    small = []
    for g in range(len(natoms_G)):
        lo, hi = offsets[g], offsets[g + 1]
        if natoms_G[g] >= min_atoms:
            owner_N[lo:hi] = domain_owners(batch.positions_N3[lo:hi].cpu().double().numpy(),
                                           batch.cell_G33[g].cpu().double().numpy(),
                                           bool(batch.periodic_G[g]), cost_N[lo:hi], parts)
            load += np.bincount(owner_N[lo:hi], cost_N[lo:hi], minlength=parts)
        else:
            small.append(g)
    for g in sorted(small, key=lambda g: (-cost_G[g], g)):
        rank = int(np.argmin(load))
        owner_N[offsets[g]:offsets[g + 1]] = rank
        load[rank] += cost_G[g]
    return owner_N


def halo(owned_N: np.ndarray, edge_index_2E: np.ndarray, triplet_index_2T: np.ndarray,
         blocks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks of the atoms, bonds and triplets whose features reach an owned atom's energy.

    From the readout back, per block: an atom's update reads every bond that starts or ends on it
    and both ends' previous features; a bond's update reads its triplet partners (the bonds sharing
    its centre) — and in the matris block also its end atoms and its triplets' features, which the
    closure keeps too (both ends of every kept bond, both bonds of every kept triplet). A needed
    feature therefore finds all its inputs in the subgraph; features of the outermost ghosts are
    computed from partial inputs, but reach no owned energy."""
    src_E, dst_E = edge_index_2E
    a_T, b_T = triplet_index_2T
    atom_N = owned_N.copy()
    bond_E = np.zeros(len(src_E), bool)
    line_T = np.zeros(len(a_T), bool)
    for _ in range(blocks):
        bond_E |= atom_N[src_E] | atom_N[dst_E]
        atom_N[src_E[bond_E]] = True
        atom_N[dst_E[bond_E]] = True
        line_T = bond_E[a_T] | bond_E[b_T]   # the triplets this block's bond updates read (grows going back)
        bond_E[a_T[line_T]] = True
        bond_E[b_T[line_T]] = True
    atom_N[src_E[bond_E]] = True  # the geometry of every bond kept
    atom_N[dst_E[bond_E]] = True
    return atom_N, bond_E, line_T


@dataclass
class HaloPlan:
    """The per-block halo exchange of one rank (`exchange_shard`): local rows it sends to each GP peer
    and local rows it overwrites with what each peer sends, peers in GP order, rows in global order."""

    atom_send_n: torch.Tensor
    atom_send_splits: tuple[int, ...]
    atom_recv_n: torch.Tensor
    atom_recv_splits: tuple[int, ...]
    bond_send_e: torch.Tensor
    bond_send_splits: tuple[int, ...]
    bond_recv_e: torch.Tensor
    bond_recv_splits: tuple[int, ...]

    def volume(self) -> dict[str, int]:
        """Rows this rank receives per exchange: the bonds' after every block's bond update, the atoms'
        between blocks (B − 1 times in a forward of B blocks)."""
        return {"halo_atoms": sum(self.atom_recv_splits), "halo_bonds": sum(self.bond_recv_splits)}


@dataclass
class GraphShard:
    """One rank's part of a batch: its subgraph, which of its atoms it owns, and the whole batch's labels."""

    local: GraphBatch           # owned and halo atoms, their bonds and triplets (labels of the whole batch unused)
    atoms_n: torch.Tensor       # local atom → batch atom
    owned_n: torch.Tensor       # local indices of the owned atoms (the readout's)
    owned_2C: np.ndarray        # routing-class counts of owned atoms and bonds (starting on an owned atom)
    labels: GraphBatch          # the whole batch without its graph: labels and sizes for the loss
    halo: HaloPlan | None = None  # the per-block exchange (halo = "exchange"); None: ghosts

    def counts(self) -> dict[str, int]:
        """The work this rank does (halo included), and the atoms it owns."""
        return {**self.local.counts(), "owned_atoms": int(self.owned_n.shape[0])}


def shard(batch: GraphBatch, owner_N: np.ndarray, gp_index: int, blocks: int, n_elements: int) -> GraphShard:
    """This GP rank's subgraph of `batch` with ghosts out to the receptive field (`halo`), on the
    batch's device (masks built on the host)."""
    owned_N = owner_N == gp_index
    atom_N, bond_E, line_T = halo(owned_N, batch.edge_index_2E.cpu().numpy(), batch.triplet_index_2T.cpu().numpy(),
                                  blocks)
    return _subgraph(batch, owned_N, atom_N, bond_E, line_T, n_elements)


def exchange_shard(batch: GraphBatch, owner_N: np.ndarray, gp_index: int, parts: int, n_elements: int) -> GraphShard:
    """This GP rank's subgraph for the per-block halo exchange: its atoms, the bonds they start (with
    all their triplets, which share the start atom), the bonds from other ranks' atoms that end on
    them, and those bonds' far ends. A block's bond update is then exact for the owned bonds (their
    line-graph partners start on the same atom), and its atom update for the owned atoms once the
    halo bonds and halo atoms hold their owners' values — which the exchange puts there after each
    bond update and before each block's atoms are read (`HaloExchange`). One hop of halo, whatever
    the number of blocks."""
    src_E, dst_E = batch.edge_index_2E.cpu().numpy()
    a_T = batch.triplet_index_2T[0].cpu().numpy()
    owned_N = owner_N == gp_index
    from_E, to_E = owner_N[src_E], owner_N[dst_E]
    bond_E = (from_E == gp_index) | (to_E == gp_index)
    cross = from_E != to_E  # a bond between domains: each end is a halo atom of the other end's owner
    needed = np.unique(np.r_[src_E[cross] * parts + to_E[cross], dst_E[cross] * parts + from_E[cross]])
    needed_atom, needed_by = needed // parts, needed % parts  # sorted by atom: both sides agree on the order
    atom_N = owned_N.copy()
    atom_N[needed_atom[needed_by == gp_index]] = True
    part = _subgraph(batch, owned_N, atom_N, bond_E, owned_N[src_E[a_T]], n_elements)  # triplets of owned bonds
    local_of_N = np.cumsum(atom_N) - 1
    local_of_E = np.cumsum(bond_E) - 1
    peers = range(parts)
    atom_send = [needed_atom[(needed_by == r) & (owner_N[needed_atom] == gp_index)] for r in peers]
    atom_recv = [needed_atom[(needed_by == gp_index) & (owner_N[needed_atom] == r)] for r in peers]
    bond_send = [np.flatnonzero((from_E == gp_index) & (to_E == r) & cross) for r in peers]
    bond_recv = [np.flatnonzero((from_E == r) & (to_E == gp_index) & cross) for r in peers]
    device = batch.positions_N3.device

    def rows(lists: list[np.ndarray], local_of: np.ndarray) -> tuple[torch.Tensor, tuple[int, ...]]:
        return torch.from_numpy(local_of[np.concatenate(lists)].astype(np.int64)).to(device), tuple(map(len, lists))

    part.halo = HaloPlan(*rows(atom_send, local_of_N), *rows(atom_recv, local_of_N),
                         *rows(bond_send, local_of_E), *rows(bond_recv, local_of_E))
    return part


def _subgraph(batch: GraphBatch, owned_N: np.ndarray, atom_N: np.ndarray, bond_E: np.ndarray, line_T: np.ndarray,
              n_elements: int) -> GraphShard:
    """The shard holding the atoms, bonds and triplets of the masks (bonds' ends and triplets' bonds included)."""
    device = batch.positions_N3.device
    edge_index_2E, triplet_index_2T = batch.edge_index_2E.cpu().numpy(), batch.triplet_index_2T.cpu().numpy()
    atoms_n, bonds_e = np.flatnonzero(atom_N), np.flatnonzero(bond_E)
    local_of_N = np.full(len(atom_N), -1, np.int64)
    local_of_N[atoms_n] = np.arange(len(atoms_n))
    local_of_E = np.full(len(bond_E), -1, np.int64)
    local_of_E[bonds_e] = np.arange(len(bonds_e))
    edge_index_2e = local_of_N[edge_index_2E[:, bonds_e]]
    class_N = batch.head_G.cpu().numpy()[batch.graph_N.cpu().numpy()] * n_elements + batch.species_N.cpu().numpy()
    n_classes = batch.route_counts_2C.shape[1]
    atoms, bonds = torch.from_numpy(atoms_n).to(device), torch.from_numpy(bonds_e).to(device)
    local = replace(batch, numbers_N=batch.numbers_N[atoms], species_N=batch.species_N[atoms],
                    positions_N3=batch.positions_N3[atoms], graph_N=batch.graph_N[atoms],
                    edge_index_2E=torch.from_numpy(edge_index_2e).to(device), shifts_E3=batch.shifts_E3[bonds],
                    triplet_index_2T=torch.from_numpy(local_of_E[triplet_index_2T[:, line_T]]).to(device),
                    forces_N3=batch.forces_N3[atoms],
                    route_counts_2C=route_class_counts(class_N[atoms_n], edge_index_2e[0], n_classes))
    owned_bonds = edge_index_2E[0, owned_N[edge_index_2E[0]]]
    owned_2C = np.stack([np.bincount(class_N[owned_N], minlength=n_classes),
                         np.bincount(class_N[owned_bonds], minlength=n_classes)]).astype(np.int64)
    empty = torch.zeros(2, 0, dtype=torch.int64, device=device)
    labels = replace(batch, edge_index_2E=empty, shifts_E3=batch.shifts_E3[:0], triplet_index_2T=empty)
    return GraphShard(local=local, atoms_n=atoms, owned_n=torch.from_numpy(local_of_N[np.flatnonzero(owned_N)]).to(device),
                      owned_2C=owned_2C, labels=labels)


class HaloExchange:
    """The runtime side of a HaloPlan: overwrites halo rows with the owners' rows over the GP group
    (the differentiable all-to-all, so forces and the double backward through it are exact; every
    rank calls it at the same places of the same forward, so the backwards meet too)."""

    def __init__(self, plan: HaloPlan, group: Group, clock: DispatchClock):
        self.plan, self.group, self.clock = plan, group, clock

    def atoms(self, node_ND: torch.Tensor) -> torch.Tensor:
        p = self.plan
        return self._refresh(node_ND, p.atom_send_n, p.atom_send_splits, p.atom_recv_n, p.atom_recv_splits)

    def bonds(self, edge_ED: torch.Tensor) -> torch.Tensor:
        p = self.plan
        return self._refresh(edge_ED, p.bond_send_e, p.bond_send_splits, p.bond_recv_e, p.bond_recv_splits)

    def _refresh(self, x_XD: torch.Tensor, send_x: torch.Tensor, send_splits: tuple[int, ...], recv_x: torch.Tensor,
                 recv_splits: tuple[int, ...]) -> torch.Tensor:
        received = all_to_all(x_XD.index_select(0, send_x), send_splits, recv_splits, self.group, self.clock)  # collective
        return x_XD.index_copy(0, recv_x, received)


def resolve_halo(halo: str, block: str) -> str:
    """"auto": the exchange where the block supports it (measured the faster and leaner, README),
    ghosts for the matris block."""
    if halo == "auto":
        return "exchange" if block == "light" else "ghost"
    if halo == "exchange" and block != "light":
        raise ValueError(f'graph parallelism: halo "exchange" needs model.block = "light", not {block!r}; '
                         'use halo "ghost"')
    return halo


class GraphParallel:
    """This rank's place in its GP group: shards a batch, and runs a micro-batch's training step or
    prediction over the group (collective over it: one Allreduce of the assembled prediction, and
    with halo = "exchange" two all-to-alls per block in the forward and in each backward)."""

    def __init__(self, topo: Topology, blocks: int, n_elements: int, min_atoms: int, weights: Weights | None = None,
                 halo: str = "ghost"):
        if halo not in ("ghost", "exchange"):
            raise ValueError(f"graph parallelism: halo {halo!r} is not 'ghost' or 'exchange'")
        self.topo = topo
        self.blocks, self.n_elements, self.min_atoms = blocks, n_elements, min_atoms
        self.weights = weights or {"atoms": 1.0, "edges": 0.0, "angles": 0.0}
        self.halo = halo
        self.group: Group | None = None
        if halo == "exchange":
            from mpi4py import MPI

            self.group = MPIGroup(topo.gp_comm, gpu_aware_mpi(MPI.Get_library_version(), dict(os.environ)))
        self.clock = DispatchClock()  # seconds in the halo exchanges

    @classmethod
    def for_model(cls, topo: Topology, model: Potential, min_atoms: int, halo: str = "auto",
                  weights: Weights | None = None) -> "GraphParallel":
        return cls(topo, len(model.blocks), len(model.cfg.elements), min_atoms, weights,
                   resolve_halo(halo, model.cfg.block))

    def shard(self, batch: GraphBatch) -> GraphShard:
        owner_N = assign_owners(batch, self.topo.layout.gp, self.min_atoms, self.weights)
        if self.halo == "exchange":
            return exchange_shard(batch, owner_N, self.topo.gp_index, self.topo.layout.gp, self.n_elements)
        return shard(batch, owner_N, self.topo.gp_index, self.blocks, self.n_elements)

    def _energy_and_gradients(self, model: Potential, part: GraphShard, routing: Routing | None,
                              plan: Recompute | None, training: bool,
                              times: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's share of the energies, and its ∂E_k/∂r (local atoms) and ∂E_k/∂ε (create_graph
        in training)."""
        t0 = time.perf_counter()
        geometry = strained_geometry(part.local)
        exchange = None if part.halo is None else HaloExchange(part.halo, self.group, self.clock)
        energy_G = energy(model, part.local, geometry, routing, plan, readout_atoms=part.owned_n, halo=exchange)
        t1 = time.perf_counter()
        grad_pos_n3, grad_strain_G33 = torch.autograd.grad(
            energy_G.sum(), (geometry.positions_N3, geometry.strain_G33), create_graph=training)
        _add(times, forward=t1 - t0, force_backward=time.perf_counter() - t1)
        return energy_G, grad_pos_n3, grad_strain_G33

    def _assemble(self, part: GraphShard, energy_G: torch.Tensor, grad_pos_n3: torch.Tensor,
                  grad_strain_G33: torch.Tensor, times: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Σ over the GP group of every rank's energies and gradients, as new leaves (collective: one
        float64 Allreduce of 10·G + 3·N numbers)."""
        t0 = time.perf_counter()
        n_graphs, n_atoms = part.labels.n_graphs, part.labels.numbers_N.shape[0]
        packed = np.zeros(10 * n_graphs + 3 * n_atoms)
        packed[:n_graphs] = energy_G.detach().cpu().double().numpy()
        packed[n_graphs:10 * n_graphs] = grad_strain_G33.detach().cpu().double().numpy().reshape(-1)
        packed[10 * n_graphs:].reshape(n_atoms, 3)[part.atoms_n.cpu().numpy()] = grad_pos_n3.detach().cpu().double().numpy()
        self.topo.gp_sum_(packed)  # collective
        total = torch.from_numpy(packed).to(device=energy_G.device, dtype=energy_G.dtype)
        _add(times, gp_sum=time.perf_counter() - t0)
        return (total[:n_graphs].requires_grad_(True),
                total[10 * n_graphs:].reshape(n_atoms, 3).requires_grad_(True),
                total[n_graphs:10 * n_graphs].reshape(n_graphs, 3, 3).requires_grad_(True))

    def predict(self, model: Potential, part: GraphShard, routing: Routing | None) -> Prediction:
        """The whole batch's energies, forces and stresses on every rank of the group (collective);
        each rank's subgraph on inference_plan's path."""
        times: dict[str, float] = {}
        energy_G, grad_pos, grad_strain = self._energy_and_gradients(model, part, routing,
                                                                     inference_plan(model, part.local), False, times)
        totals = self._assemble(part, energy_G, grad_pos, grad_strain, times)
        return prediction(*(t.detach() for t in totals), part.labels)

    def predict_alone(self, model: Potential, batch: GraphBatch) -> Prediction:
        """Inference where every rank holds every expert (predict, the ASE calculator): shard, local
        routing, predict (collective over the GP group)."""
        part = self.shard(batch)
        return self.predict(model, part, local_routing(model, part.local) if model.moe_layers else None)

    def loss_and_gradients(self, model: Potential, part: GraphShard, loss_cfg: LossConfig, loss_scale: float,
                           routing: Routing | None, plan: Recompute | None, aux: torch.Tensor | None,
                           times: dict[str, float]) -> dict[str, torch.Tensor]:
        """One micro-batch's loss on the whole batch and this rank's share of its parameter gradients
        (collective over the GP group). `aux`: a loss that depends on no structure, added once per
        group (GP index 0). Returns the per-structure loss terms (the same on every rank of the group)."""
        halo_seconds = self.clock.seconds
        energy_G, grad_pos_n3, grad_strain_G33 = self._energy_and_gradients(model, part, routing, plan, True, times)
        total_G, total_pos_N3, total_strain_G33 = self._assemble(part, energy_G, grad_pos_n3, grad_strain_G33, times)
        t0 = time.perf_counter()
        losses = structure_losses(prediction(total_G, total_pos_N3, total_strain_G33, part.labels), part.labels, loss_cfg)
        adjoint_G, adjoint_N3, adjoint_G33 = torch.autograd.grad(losses["total"].sum() * loss_scale,
                                                                 (total_G, total_pos_N3, total_strain_G33))
        # This rank's terms of dL/dθ = Σ_k [∂L/∂E·∂E_k/∂θ + ∂L/∂(∂E/∂r)·∂²E_k/∂r∂θ + ∂L/∂(∂E/∂ε)·∂²E_k/∂ε∂θ]
        share = ((adjoint_G * energy_G).sum() + (adjoint_N3[part.atoms_n] * grad_pos_n3).sum()
                 + (adjoint_G33 * grad_strain_G33).sum())
        if aux is not None and self.topo.gp_index == 0:
            share = share + aux
        share.backward()  # the double backward through this rank's subgraph; armed reducers launch from here
        _add(times, param_backward=time.perf_counter() - t0,
             alltoall=routing.clock.seconds if routing is not None else 0.0)
        if part.halo is not None:
            _add(times, gp_halo=self.clock.seconds - halo_seconds)
        return losses


def _add(times: dict[str, float], **seconds: float) -> None:
    for key, value in seconds.items():
        times[key] = times.get(key, 0.0) + value
