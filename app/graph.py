"""Batched atom graphs and line graphs, built from vesin neighbour lists.

Shapes: N atoms, E directed edges (src → dst, within the cutoff, periodic images included),
T triplets (pairs of edges sharing their src atom, both shorter than the three-body cutoff),
G graphs (structures). Graph construction is not differentiated: it fixes *which* pairs
interact; the smooth envelopes make the energy continuous as pairs enter or leave.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from exaforce.io.neighbours import neighbour_pairs
from exaforce.io.schema import Frames


def route_class_counts(class_N: np.ndarray, src_E: np.ndarray, n_classes: int) -> np.ndarray:
    """2×C table: atoms of each routing class (head·Z + element), bonds by their source atom's class
    (rows: exaforce.model.routing.ATOMS, BONDS). The MoE's split sizes follow from it before the forward."""
    atoms_C = np.bincount(class_N, minlength=n_classes)
    bonds_C = np.bincount(class_N[src_E], minlength=n_classes)
    return np.stack([atoms_C, bonds_C]).astype(np.int64)


@dataclass
class GraphBatch:
    """One batch of structures as explicit tensors, plus the labels it is trained on."""

    numbers_N: torch.Tensor       # int64 atomic numbers
    species_N: torch.Tensor       # int64 index into the model's element list
    positions_N3: torch.Tensor    # Å, moved near the origin (wrapped into the cell, molecules centred)
    cell_G33: torch.Tensor        # rows are lattice vectors; zeros where non-periodic
    graph_N: torch.Tensor         # int64 graph index of each atom
    natoms_G: torch.Tensor        # int64
    edge_index_2E: torch.Tensor   # int64 (src, dst)
    shifts_E3: torch.Tensor       # integer cell shifts of dst (as the float dtype)
    triplet_index_2T: torch.Tensor  # int64 (edge a, edge b) with src[a] == src[b], a != b
    energy_G: torch.Tensor
    forces_N3: torch.Tensor
    stress_G6: torch.Tensor       # NaN rows: no stress label
    periodic_G: torch.Tensor      # bool: periodic in some direction, so a cell and stress (slabs: two)
    head_G: torch.Tensor          # int64 energy head (dataset/fidelity) of each graph
    route_counts_2C: np.ndarray   # host: atoms and bonds (by source atom) per routing class head·Z + element

    @property
    def n_graphs(self) -> int:
        return int(self.natoms_G.shape[0])

    def counts(self) -> dict[str, int]:
        """Atoms, edges and angles: the cost drivers (and FLOP model inputs) of a step."""
        return {"structures": self.n_graphs, "atoms": int(self.numbers_N.shape[0]),
                "edges": int(self.edge_index_2E.shape[1]), "angles": int(self.triplet_index_2T.shape[1])}

    def to(self, device: torch.device | str, dtype: torch.dtype, pin: bool = False) -> "GraphBatch":
        """Floating fields in `dtype` (converted on the host first: fewer bytes to move). pin: through
        page-locked host memory with non-blocking copies (to an accelerator: the copy overlaps the
        device's work; the stream orders it before any kernel that reads it)."""
        moved = {}
        for f in fields(self):
            t = getattr(self, f.name)
            if isinstance(t, np.ndarray):  # host-side metadata stays on the host
                moved[f.name] = t
                continue
            t = t.to(dtype=dtype) if t.is_floating_point() else t
            pinned = pin and t.device.type == "cpu"  # a tensor already on the accelerator stays where it is
            moved[f.name] = t.pin_memory().to(device, non_blocking=True) if pinned else t.to(device)
        return GraphBatch(**moved)


def _neighbours(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float):
    """Directed pairs (i, j, shift) with |r_j + shift·cell − r_i| < cutoff for one structure."""
    i, j, shifts = neighbour_pairs(positions, cell, pbc, cutoff)
    return i.astype(np.int64), j.astype(np.int64), shifts.astype(np.int64)


def _triplets(src_E: np.ndarray, short_E: np.ndarray) -> np.ndarray:
    """All ordered pairs (a, b), a != b, of short edges that share their src atom; no loop over atoms."""
    short = np.flatnonzero(short_E)
    order = short[np.argsort(src_E[short], kind="stable")]
    centre = src_E[order]
    # Group boundaries of equal centres; each group of size n contributes n·(n−1) pairs.
    starts = np.flatnonzero(np.r_[True, centre[1:] != centre[:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    pair_counts = sizes * sizes
    total = int(pair_counts.sum())
    group = np.repeat(np.arange(len(starts)), pair_counts)
    local = np.arange(total) - np.repeat(np.cumsum(pair_counts) - pair_counts, pair_counts)
    a = starts[group] + local // sizes[group]
    b = starts[group] + local % sizes[group]
    keep = a != b
    return np.stack([order[a[keep]], order[b[keep]]])


def _near_origin(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """The structure moved near the origin by symmetries of its energy (float64): periodic
    directions wrapped into the cell, a molecule centred. Edge vectors in float32 are then
    differences of small numbers, whatever coordinates the data came with (unwrapped MD)."""
    if not pbc.any():
        return positions - positions.mean(0)
    fractional = np.linalg.solve(cell.T, positions.T).T
    fractional[:, pbc] -= np.floor(fractional[:, pbc])
    return fractional @ cell


def build_batch(frames: Frames, species_of: np.ndarray, cutoff: float, three_body_cutoff: float,
                head_S: np.ndarray | None = None, n_heads: int = 1) -> GraphBatch:
    """Collates structures into one graph batch; `species_of[Z]` maps atomic number → element index,
    `head_S` gives each structure's energy head (default 0) out of `n_heads`."""
    offsets = frames.offsets_S
    positions_N3 = np.empty_like(frames.positions_N3)
    src, dst, shifts = [], [], []
    for s in range(len(frames)):
        lo, hi = offsets[s], offsets[s] + frames.natoms_S[s]
        positions_N3[lo:hi] = _near_origin(frames.positions_N3[lo:hi], frames.cell_S33[s], frames.pbc_S3[s])
        i, j, sh = _neighbours(positions_N3[lo:hi], frames.cell_S33[s], frames.pbc_S3[s], cutoff)
        src.append(i + lo)
        dst.append(j + lo)
        shifts.append(sh)
    src_E = np.concatenate(src) if src else np.zeros(0, np.int64)
    dst_E = np.concatenate(dst) if dst else np.zeros(0, np.int64)
    shifts_E3 = np.concatenate(shifts) if shifts else np.zeros((0, 3), np.int64)
    graph_N = np.repeat(np.arange(len(frames)), frames.natoms_S)
    vec_E3 = (positions_N3[dst_E] - positions_N3[src_E]
              + np.einsum("ek,ekx->ex", shifts_E3, frames.cell_S33[graph_N[src_E]]))
    short_E = np.linalg.norm(vec_E3, axis=1) < three_body_cutoff
    periodic_G = frames.pbc_S3.any(axis=1)  # a cell (with volume): stress defined, slabs included
    species_N = species_of[frames.numbers_N].astype(np.int64)
    n_elements = int(species_of.max()) + 1
    head_S = np.zeros(len(frames), np.int64) if head_S is None else np.asarray(head_S, np.int64)
    class_N = head_S[graph_N] * n_elements + species_N
    return GraphBatch(
        numbers_N=torch.from_numpy(frames.numbers_N.astype(np.int64)),
        species_N=torch.from_numpy(species_N),
        positions_N3=torch.from_numpy(positions_N3),
        cell_G33=torch.from_numpy(frames.cell_S33 * periodic_G[:, None, None]),
        graph_N=torch.from_numpy(graph_N.astype(np.int64)),
        natoms_G=torch.from_numpy(frames.natoms_S.astype(np.int64)),
        edge_index_2E=torch.from_numpy(np.stack([src_E, dst_E])),
        shifts_E3=torch.from_numpy(shifts_E3.astype(np.float64)),
        triplet_index_2T=torch.from_numpy(_triplets(src_E, short_E)),
        energy_G=torch.from_numpy(frames.energy_S),
        forces_N3=torch.from_numpy(frames.forces_N3),
        stress_G6=torch.from_numpy(frames.stress_S6),
        periodic_G=torch.from_numpy(periodic_G),
        head_G=torch.from_numpy(head_S),
        route_counts_2C=route_class_counts(class_N, src_E, n_heads * n_elements),
    )


def batch_from_atoms(atoms_list: list, species_of: np.ndarray, cutoff: float, three_body_cutoff: float,
                     head: int = 0, n_heads: int = 1) -> GraphBatch:
    """A batch of unlabelled ase.Atoms (for inference and tests), all on one head: labels are zeros/NaN."""
    natoms_S = np.array([len(a) for a in atoms_list], dtype=np.int64)
    n_atoms, n_structures = int(natoms_S.sum()), len(atoms_list)
    frames = Frames(
        numbers_N=np.concatenate([a.numbers for a in atoms_list]).astype(np.int64),
        positions_N3=np.concatenate([a.positions for a in atoms_list]).astype(np.float64),
        forces_N3=np.zeros((n_atoms, 3)),
        cell_S33=np.stack([a.cell.array for a in atoms_list]).astype(np.float64),
        pbc_S3=np.stack([a.pbc for a in atoms_list]),
        energy_S=np.zeros(n_structures),
        stress_S6=np.full((n_structures, 6), np.nan),
        natoms_S=natoms_S,
    )
    return build_batch(frames, species_of, cutoff, three_body_cutoff, np.full(len(atoms_list), head), n_heads)


def structure_counts(frames: Frames, cutoff: float, three_body_cutoff: float) -> np.ndarray:
    """S×3 (atoms, edges, angles) of each structure's graphs: the inputs of the step-cost model."""
    out = np.zeros((len(frames), 3), np.int64)
    for s, (lo, n) in enumerate(zip(frames.offsets_S.tolist(), frames.natoms_S.tolist())):
        pos = frames.positions_N3[lo:lo + n]
        i, j, sh = _neighbours(pos, frames.cell_S33[s], frames.pbc_S3[s], cutoff)
        vec = pos[j] - pos[i] + sh @ frames.cell_S33[s]
        out[s] = n, len(i), _triplets(i, np.linalg.norm(vec, axis=1) < three_body_cutoff).shape[1]
    return out
