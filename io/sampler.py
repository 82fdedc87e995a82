"""Which structures each step trains on, and which rank takes which: pure functions of the
replicated per-structure facts, so every rank computes the same answer without communicating.

Epoch: each training structure with weight w appears ⌊w⌋ times plus once more with probability
w − ⌊w⌋ (a seeded choice), so weight 1 visits every structure exactly once per epoch and larger
weights oversample small datasets; the list of n structures is shuffled (seeded by seed and epoch)
and cut into ⌊n / global_batch⌋ global batches of near-equal size (global_batch to
2·global_batch − 1 structures, the remainder spread over them; one batch if n < global_batch).
Step k's global batch is therefore a pure function of (seed, epoch, k), never of the number of
ranks: a run resumed on a different number of ranks trains on the same global batches (the one
exception: an epoch drawn with fewer structures than ranks, possible only with weights < 1, is
skipped). Deal: longest-processing-time first — structures by decreasing predicted cost, each to
the rank with the least cost so far — or round-robin (`balance = False`, the naive baseline).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """(start, count) of rank's contiguous share of n items; the first n % world ranks get one more."""
    if world < 1 or not 0 <= rank < world or n < 0:
        raise ValueError(f"shard_range(n={n}, rank={rank}, world={world}): need n >= 0, 0 <= rank < world")
    base, extra = divmod(n, world)
    return rank * base + min(rank, extra), base + (rank < extra)


def epoch_order(weight_G: np.ndarray, train_G: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """This epoch's training structures (global indices, repeated by weight), shuffled."""
    rng = np.random.default_rng([seed, epoch, 11])
    train = np.flatnonzero(train_G)
    weight = weight_G[train]
    whole = np.floor(weight).astype(np.int64)
    extra = rng.random(len(train)) < weight - whole
    order = np.repeat(train, whole + extra)
    return order[rng.permutation(len(order))]


def global_batches(weight_G: np.ndarray, train_G: np.ndarray, global_batch: int, world: int,
                   seed: int, start_step: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """(epoch, global indices) of every step after the first `start_step` (the sampler position of
    a resumed run), forever. `world` is checked, and used only to skip a degenerate epoch."""
    if global_batch < world:
        raise ValueError(f"data.global_batch_size = {global_batch}: must be >= the {world} ranks")
    if float(weight_G[train_G].sum()) < world:
        raise ValueError(f"an epoch holds about {weight_G[train_G].sum():.1f} structures, fewer than the {world} ranks")
    if start_step < 0:
        raise ValueError(f"start_step = {start_step}: must be >= 0")
    skip = start_step
    for epoch in itertools.count():
        order = epoch_order(weight_G, train_G, seed, epoch)
        if len(order) < world:  # an epoch drawn shorter than the world (weights < 1): draw the next
            continue
        batches = np.array_split(order, max(1, len(order) // global_batch))
        if skip >= len(batches):  # resuming: this whole epoch was trained on before
            skip -= len(batches)
            continue
        for batch in batches[skip:]:
            yield epoch, batch
        skip = 0


def deal(indices: np.ndarray, cost: np.ndarray, world: int, balance: bool = True) -> list[np.ndarray]:
    """One step's structures → ranks: by cost (longest first to the least-loaded rank), or round-robin."""
    if not balance:
        return [np.sort(indices[r::world]) for r in range(world)]
    load = np.zeros(world)
    shares: list[list[int]] = [[] for _ in range(world)]
    for i in np.argsort(-np.asarray(cost), kind="stable"):
        r = int(np.argmin(load))
        shares[r].append(int(indices[i]))
        load[r] += cost[i]
    return [np.asarray(sorted(s), dtype=np.int64) for s in shares]
