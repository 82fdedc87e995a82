"""Expert placement from measured load (exaforce.parallel.placement): balanced, equal counts, stable;
replicas of the busiest experts in spare slots, their rows split among the holders."""

from __future__ import annotations

import numpy as np
import pytest

from exaforce.model.routing import (contiguous_placement, holder_shares, single_owner_placement,
                                   split_pairs)
from exaforce.parallel.placement import balanced_placement, max_over_mean, rank_work


def experts_per_rank(placement, ep: int) -> list[int]:
    return np.bincount([r for holders in placement for r in holders], minlength=ep).tolist()


def test_a_skewed_load_is_balanced_with_the_same_number_of_experts_per_rank():
    # Two elements take most tokens and their experts sit on rank 0 in the default placement.
    load_X = np.array([400, 350, 20, 20, 60, 50, 30, 10])
    contiguous = contiguous_placement(8, 2)
    balanced = balanced_placement(load_X, 2)
    assert max_over_mean(load_X, contiguous, 2) == pytest.approx(790 / 470)
    assert max_over_mean(load_X, balanced, 2) <= 1.03
    assert experts_per_rank(balanced, 2) == [4, 4]
    assert rank_work(load_X, balanced, 2).sum() == load_X.sum()


def test_equal_loads_leave_every_expert_where_it_is():
    current = single_owner_placement([3, 0, 2, 1, 1, 3, 0, 2])
    assert balanced_placement(np.ones(8), 4, current) == current


def test_never_worse_than_the_default_on_random_loads():
    rng = np.random.default_rng(0)
    for _ in range(200):
        ep = int(rng.choice([2, 4, 8]))
        load_X = rng.pareto(1.5, 16) * 100  # heavy-tailed, as top-k routing of a skewed composition
        balanced = balanced_placement(load_X, ep)
        assert experts_per_rank(balanced, ep) == [16 // ep] * ep
        assert max_over_mean(load_X, balanced, ep) <= max_over_mean(load_X, contiguous_placement(16, ep), ep) + 1e-12


def test_an_expert_above_one_rank_share_needs_replicas_to_balance():
    # One expert carries 40 % of the work: without replicas its rank has at least 1.6 × the mean.
    load_X = np.array([400, 150, 100, 100, 80, 70, 60, 40])
    ep = 4
    assert max_over_mean(load_X, balanced_placement(load_X, ep), ep) >= 1.6
    replicated = balanced_placement(load_X, ep, spare_slots=1)
    assert max_over_mean(load_X, replicated, ep) <= 1.1
    assert experts_per_rank(replicated, ep) == [3] * ep
    assert all(len(set(h)) == len(h) for h in replicated)  # copies on different ranks
    assert len(replicated[0]) > 1
    assert rank_work(load_X, replicated, ep).sum() == pytest.approx(load_X.sum())


def test_replicas_keep_their_owner_and_split_every_source_ranks_pairs():
    current = contiguous_placement(4, 2)
    placement = balanced_placement(np.array([100, 1, 1, 1]), 2, current, spare_slots=1)
    assert placement[0][0] == 0 and set(placement[0]) == {0, 1}  # expert 0 still owned by rank 0
    pairs_RX = np.array([[5, 1, 0, 2], [7, 0, 3, 0]])
    pieces_RXP = split_pairs(pairs_RX, placement, 2)
    assert (pieces_RXP.sum(-1) == pairs_RX).all()          # every pair goes somewhere, once


def test_a_replicated_expert_levels_this_steps_rows_over_its_holders():
    # Rank 0 runs 6 rows of a single-held expert; the replicated one's 10 rows fill both ranks to 8.
    placement = ((0, 1), (0,), (1,))
    shares = holder_shares(np.array([10, 6, 0]), placement, 2)
    assert shares[0] == pytest.approx([0.2, 0.8])
    pieces_RXP = split_pairs(np.array([[5, 3, 0], [5, 3, 0]]), placement, 2)
    assert pieces_RXP.sum((0, 1)).tolist() == [8, 8]        # the step's rows balanced exactly
    assert pieces_RXP[:, 0].tolist() == [[1, 4], [1, 4]]    # each source: floor(5·0.2), the rest


def test_experts_that_do_not_split_evenly_are_refused():
    with pytest.raises(ValueError, match="6 experts do not split evenly over 4"):
        balanced_placement(np.ones(6), 4)
    with pytest.raises(ValueError, match="3 spare expert slots per rank: must be between 0 and 2"):
        balanced_placement(np.ones(8), 4, spare_slots=3)
