"""Pairs of atoms closer than a cutoff in one structure, by vesin's cell list (O(N)): the graph's
bonds, and the data checks' coincident atoms."""

from __future__ import annotations

import numpy as np
import vesin


def neighbour_pairs(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float,
                    full_list: bool = True, quantities: str = "ijS") -> list[np.ndarray]:
    """vesin's `quantities` (i, j, shift S, distance d) of the pairs |r_j + S·cell − r_i| < cutoff;
    shifts only along the periodic directions (a slab: two). full_list: both directions of a pair."""
    box = cell if pbc.any() else np.zeros((3, 3))
    return list(vesin.NeighborList(cutoff=cutoff, full_list=full_list).compute(
        points=positions, box=box, periodic=[bool(p) for p in pbc], quantities=quantities))
