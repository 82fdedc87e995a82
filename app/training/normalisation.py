"""Per-head energy normalisation fitted from the training data before the first step."""

from __future__ import annotations

import math

import numpy as np
import torch

from exaforce.io.sampler import shard_range
from exaforce.io.schema import Frames
from exaforce.model.potential import Potential
from exaforce.parallel.topology import Topology
from exaforce.training.data import GlobalIndex


def fit_energy_normalisation(model: Potential, shards: list[Frames], index: GlobalIndex, topo: Topology) -> None:
    """Per head: per-element reference energies by least squares over its training structures, and
    the energy scale as their RMS force component; from all-reduced sums, so every rank (and any
    number of ranks) gets the same values. Validation structures take no part."""
    n_heads, n_elements = len(model.cfg.heads), len(model.cfg.elements)
    species_of = model.species_table()
    sums = np.zeros((n_heads, n_elements**2 + n_elements + 2))
    first = np.r_[0, np.cumsum(np.bincount(index.dataset_G, minlength=len(shards)))[:-1]]
    for d, frames in enumerate(shards):
        start, _ = shard_range(int(np.sum(index.dataset_G == d)), topo.rank, topo.world_size)
        g = first[d] + start + np.arange(len(frames))
        keep_S = ~index.is_val_G[g]
        if not len(frames):
            continue
        head = int(index.head_G[first[d]])
        graph_N = np.repeat(np.arange(len(frames)), frames.natoms_S)
        counts_SX = np.zeros((len(frames), n_elements))
        np.add.at(counts_SX, (graph_N, species_of[frames.numbers_N]), 1.0)
        counts_SX, energy_S = counts_SX[keep_S], frames.energy_S[keep_S]
        forces = frames.forces_N3[keep_S[graph_N]]
        sums[head] += np.concatenate([(counts_SX.T @ counts_SX).ravel(), counts_SX.T @ energy_S,
                                      [np.square(forces).sum(), forces.size]])
    sums = topo.sum(sums)  # collective: normal equations and force moments per head
    for h in range(n_heads):
        ata = sums[h, :n_elements**2].reshape(n_elements, n_elements)
        atb = sums[h, n_elements**2:n_elements**2 + n_elements]
        reference_X = np.linalg.lstsq(ata, atb, rcond=None)[0]  # elements absent from the data get 0
        force_rms = math.sqrt(sums[h, -2] / max(sums[h, -1], 1.0))
        model.reference_energy_HX[h].copy_(torch.from_numpy(reference_X))
        model.energy_scale_H[h].fill_(force_rms if force_rms > 0 else 1.0)
