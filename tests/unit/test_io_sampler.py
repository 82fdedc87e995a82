"""The global sampler without MPI: every rank computes the same epochs and deals; weight-1 datasets
are visited exactly once per epoch across ranks, weights oversample within 2%, and the
cost-balanced deal evens the ranks' predicted cost."""

import itertools

import numpy as np
import pytest

from exaforce.io.sampler import deal, epoch_order, global_batches

pytestmark = pytest.mark.data


def epochs(weight, train, global_batch, world, seed, n_epochs):
    """{epoch: [per-rank lists of indices]} from the step generator and a round-robin deal."""
    out = {}
    for epoch, steps in itertools.groupby(global_batches(weight, train, global_batch, world, seed), lambda s: s[0]):
        if epoch == n_epochs:
            return out
        out[epoch] = [deal(batch, np.ones(len(batch)), world) for _, batch in steps]


@pytest.mark.parametrize("n, global_batch, world", [(13, 4, 1), (13, 4, 2), (50, 8, 4), (7, 4, 4), (100, 32, 2)])
def test_every_training_structure_once_per_epoch_across_ranks(n, global_batch, world):
    train = np.ones(n, bool)
    train[::5] = False  # a validation split is never trained on
    for epoch, steps in epochs(np.ones(n), train, global_batch, world, seed=3, n_epochs=3).items():
        seen = np.concatenate([share for shares in steps for share in shares])
        assert sorted(seen.tolist()) == np.flatnonzero(train).tolist(), epoch
        assert all(len(share) >= 1 for shares in steps for share in shares)  # no rank ever idle


def test_epochs_are_reshuffled_and_deterministic():
    a = epoch_order(np.ones(40), np.ones(40, bool), seed=1, epoch=0)
    assert np.array_equal(a, epoch_order(np.ones(40), np.ones(40, bool), seed=1, epoch=0))
    assert not np.array_equal(a, epoch_order(np.ones(40), np.ones(40, bool), seed=1, epoch=1))


def test_oversampling_weights_are_respected_within_two_percent():
    # Dataset A: 300 structures, weight 1; dataset B: 100 structures, weight 2.5.
    weight = np.r_[np.ones(300), np.full(100, 2.5)]
    visits = np.zeros(400)
    for epoch in range(40):
        np.add.at(visits, epoch_order(weight, np.ones(400, bool), seed=9, epoch=epoch), 1)
    assert np.all(visits[:300] == 40)  # weight 1: exactly once per epoch
    assert visits[300:].mean() / 40 == pytest.approx(2.5, rel=0.02)
    assert set(np.unique(visits[300:] % 40).tolist()) <= set(range(0, 41))


def test_balanced_deal_evens_cost_where_round_robin_does_not():
    rng = np.random.default_rng(0)
    cost = np.r_[rng.uniform(1, 2, 24), rng.uniform(20, 40, 8)]  # small molecules and big metal cells
    indices = np.arange(32)
    for balance, limit in ((True, 1.05), (False, None)):
        shares = deal(indices, cost, 2, balance)
        assert sorted(np.concatenate(shares).tolist()) == indices.tolist()
        loads = [cost[s].sum() for s in shares]
        if limit:
            assert max(loads) / np.mean(loads) <= limit


def test_bad_arguments():
    with pytest.raises(ValueError, match="must be >= the 4 ranks"):
        next(global_batches(np.ones(10), np.ones(10, bool), 2, 4, seed=0))
