"""The training data as every rank sees it: several datasets (fidelities) in one global index space,
a validation split, per-structure cost, and readers that fetch any structure by global index.

Global index g runs over the datasets in config order. Every rank knows, for every structure, its
dataset, head, atom/edge/angle counts (built from its own contiguous shard, then one allgather)
and whether it is held out for validation, so every rank computes the same epoch order and the
same deal without further communication. A rank then fetches its structures: lazily from the
(staged) BP5 files by hyperslab, or through the MPI one-sided sample store (`data.sample_store`).

Which structures a step takes and which rank takes them: `exaforce.io.sampler`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from exaforce.config import DatasetConfig
from exaforce.device import to_device
from exaforce.graph import GraphBatch, build_batch, structure_counts
from exaforce.io.bp import open_bp
from exaforce.io.sampler import shard_range
from exaforce.io.schema import DataError, Frames
from exaforce.io.store import SampleStore


@dataclass
class GlobalIndex:
    """Replicated per-structure facts for all G structures of all datasets."""

    dataset_G: np.ndarray     # int64 dataset position in the config
    local_G: np.ndarray       # int64 index within its dataset
    head_G: np.ndarray        # int64 energy head
    counts_G3: np.ndarray     # int64 atoms, edges, angles
    is_val_G: np.ndarray      # bool held out for validation
    weight_G: np.ndarray      # float64 sampling weight of its dataset

    def __len__(self) -> int:
        return len(self.dataset_G)

    @property
    def n_train(self) -> int:
        return int((~self.is_val_G).sum())


def validation_mask(n: int, fraction: float, seed: int, dataset: int) -> np.ndarray:
    """A seeded choice of round(fraction·n) structures of one dataset (the same on every rank)."""
    mask = np.zeros(n, bool)
    mask[np.random.default_rng([seed, dataset, 7]).permutation(n)[:round(fraction * n)]] = True
    return mask


def build_global_index(sources: tuple[DatasetConfig, ...], heads: tuple[str, ...], species_of: np.ndarray,
                       cutoff: float, three_body_cutoff: float, seed: int, topo: Any) -> tuple[GlobalIndex, list[Frames]]:
    """Collective: each rank reads its contiguous shard of every dataset (one read per variable),
    checks it, counts its graphs; one allgather makes the per-structure counts global.
    Returns the index and this rank's shards (for the normalisation fit and the sample store)."""
    rank, size = topo.rank, topo.world_size
    shards, sizes, local_counts = [], [], []
    for source in sources:
        with open_bp(source.path) as dataset:
            start, count = shard_range(dataset.n_structures, rank, size)
            frames = dataset.read(start, count)
            sizes.append(dataset.n_structures)
        check_frames(frames, source.path, start, species_of)
        shards.append(frames)
        local_counts.append(structure_counts(frames, cutoff, three_body_cutoff))
    gathered = topo.allgather(local_counts)  # collective: [rank][dataset] → S×3 counts
    dataset_G, local_G, head_G, counts, is_val, weight = [], [], [], [], [], []
    for d, (source, n) in enumerate(zip(sources, sizes)):
        dataset_G.append(np.full(n, d))
        local_G.append(np.arange(n))
        head_G.append(np.full(n, heads.index(source.head)))
        counts.append(np.concatenate([gathered[r][d] for r in range(size)]))
        is_val.append(validation_mask(n, source.val_fraction, seed, d))
        weight.append(np.full(n, source.weight))
    index = GlobalIndex(np.concatenate(dataset_G), np.concatenate(local_G), np.concatenate(head_G),
                        np.concatenate(counts).reshape(-1, 3), np.concatenate(is_val), np.concatenate(weight))
    return index, shards


def check_frames(frames: Frames, path: str, start: int, species_of: np.ndarray) -> None:
    """Every structure the model will see: known elements and finite labels, named by sample."""
    unknown_N = species_of[frames.numbers_N] < 0
    if unknown_N.any():
        atom = int(np.flatnonzero(unknown_N)[0])
        sample = start + int(np.searchsorted(frames.offsets_S, atom, side="right") - 1)
        raise DataError(path, f"element Z={frames.numbers_N[atom]} is not in model.elements", frame=sample,
                        field="numbers")
    for field, array in (("energy", frames.energy_S), ("forces", frames.forces_N3)):
        if not np.isfinite(array).all():
            bad = np.flatnonzero(~np.isfinite(array.reshape(len(array), -1)).all(-1))[0]
            sample = start + (int(bad) if field == "energy" else
                              int(np.searchsorted(frames.offsets_S, bad, side="right") - 1))
            raise DataError(path, "non-finite label", frame=sample, field=field)


def steps_in_epoch(index: GlobalIndex, global_batch: int) -> int:
    """Expected steps per epoch (the epoch's length varies with fractional weights by a few structures)."""
    expected = float(index.weight_G[~index.is_val_G].sum())
    return max(1, math.ceil(expected / global_batch))


def structure_cost(index: GlobalIndex, coefficients: dict[str, float]) -> np.ndarray:
    """Predicted seconds (or FLOPs) of each structure: a·atoms + b·edges + c·angles (no constant)."""
    return index.counts_G3 @ np.array([coefficients["atoms"], coefficients["edges"], coefficients["angles"]])


class DatasetReader:
    """Fetches structures by global index, dataset by dataset, in the requested order (repeats allowed)."""

    def __init__(self, index: GlobalIndex, fetch_one: list[Callable[[np.ndarray], Frames]],
                 close: Callable[[], None]):
        self.index, self._fetch_one, self._close = index, fetch_one, close

    def fetch(self, global_indices: np.ndarray) -> Frames:
        parts, order = [], []
        by_dataset = self.index.dataset_G[global_indices]
        for d in np.unique(by_dataset):
            picked = np.flatnonzero(by_dataset == d)
            # The model takes no charge/spin/magmoms yet: drop them so datasets with and without mix.
            parts.append(self._fetch_one[d](self.index.local_G[global_indices[picked]]).without_optional())
            order.append(picked)
        return Frames.concatenate(parts).select(np.argsort(np.concatenate(order), kind="stable"))

    def close(self) -> None:
        self._close()


def lazy_reader(sources: tuple[DatasetConfig, ...], index: GlobalIndex) -> DatasetReader:
    """Reads from the (staged) BP5 files: one hyperslab per run of consecutive indices."""
    datasets = [open_bp(s.path) for s in sources]

    def reader(dataset) -> Callable[[np.ndarray], Frames]:
        def fetch(local: np.ndarray) -> Frames:
            sort = np.argsort(local, kind="stable")
            runs = np.split(local[sort], np.flatnonzero(np.diff(local[sort]) != 1) + 1)
            frames = Frames.concatenate([dataset.read(int(run[0]), len(run)) for run in runs])
            return frames.select(np.argsort(sort, kind="stable"))
        return fetch

    return DatasetReader(index, [reader(d) for d in datasets], lambda: [d.close() for d in datasets] and None)


def store_reader(shards: list[Frames], index: GlobalIndex, topo: Any) -> DatasetReader:
    """Collective: one MPI one-sided sample store per dataset, built from this rank's shards."""
    stores = []
    for d, shard in enumerate(shards):
        start, _ = shard_range(int(np.sum(index.dataset_G == d)), topo.rank, topo.world_size)
        stores.append(SampleStore(shard, start, topo.world))  # the store's window lives on the world
    return DatasetReader(index, [store.fetch for store in stores], lambda: [store.free() for store in stores] and None)


@dataclass
class TrainingData:
    """The run's datasets as the step loop sees them: the replicated index, this rank's reader, and
    how structures become graph batches for this model."""

    sources: tuple[DatasetConfig, ...]
    index: GlobalIndex
    reader: DatasetReader
    species_of: np.ndarray
    cutoff: float
    three_body_cutoff: float
    n_heads: int
    dtype: torch.dtype
    device: torch.device = torch.device("cpu")

    def batch(self, global_indices: np.ndarray) -> GraphBatch:
        """Graphs of these structures (neighbour lists built here, on the host), in the run's dtype,
        on the rank's device."""
        return to_device(build_batch(self.reader.fetch(global_indices), self.species_of, self.cutoff,
                                     self.three_body_cutoff, self.index.head_G[global_indices], self.n_heads),
                         self.device, self.dtype)
