"""Which local structures each rank trains on at each step.

Every rank holds a contiguous shard of each dataset and draws its share of the global batch from
it, reshuffled each epoch. Steps per epoch are the same on every rank (the smallest shard
decides), computed from dataset sizes alone, so ranks agree without communicating.
"""

from __future__ import annotations

import numpy as np


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """(start, count) of rank's contiguous share of n items; the first n % world ranks get one more."""
    if world < 1 or not 0 <= rank < world or n < 0:
        raise ValueError(f"shard_range(n={n}, rank={rank}, world={world}): need n >= 0, 0 <= rank < world")
    base, extra = divmod(n, world)
    return rank * base + min(rank, extra), base + (rank < extra)


def steps_per_epoch(dataset_sizes: list[int], world: int, per_rank_batch: int) -> int:
    smallest_shard = min(sum(shard_range(n, r, world)[1] for n in dataset_sizes) for r in range(world))
    return smallest_shard // per_rank_batch


class ShardSampler:
    """Batches of local indices for (epoch, step); deterministic in (seed, rank, epoch)."""

    def __init__(self, n_local: int, per_rank_batch: int, steps: int, seed: int, rank: int):
        if steps < 1:
            raise ValueError(f"a rank holds {n_local} structures, fewer than its batch of {per_rank_batch}: "
                             "lower data.global_batch_size or use fewer ranks")
        self.n_local, self.per_rank_batch, self.steps = n_local, per_rank_batch, steps
        self.seed, self.rank = seed, rank

    def batch(self, epoch: int, step_in_epoch: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, self.rank, epoch]).permutation(self.n_local)
        lo = step_in_epoch * self.per_rank_batch
        return order[lo:lo + self.per_rank_batch]
