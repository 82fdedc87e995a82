"""Expert placement from measured load (exaforce.parallel.placement): balanced, equal counts, stable."""

from __future__ import annotations

import numpy as np
import pytest

from exaforce.model.routing import contiguous_placement
from exaforce.parallel.placement import balanced_placement, max_over_mean, rank_work


def test_a_skewed_load_is_balanced_with_the_same_number_of_experts_per_rank():
    # Two elements take most tokens and their experts sit on rank 0 in the default placement.
    load_X = np.array([400, 350, 20, 20, 60, 50, 30, 10])
    contiguous = contiguous_placement(8, 2)
    balanced = balanced_placement(load_X, 2)
    assert max_over_mean(load_X, contiguous, 2) == pytest.approx(790 / 470)
    assert max_over_mean(load_X, balanced, 2) <= 1.03
    assert np.bincount(balanced, minlength=2).tolist() == [4, 4]
    assert rank_work(load_X, balanced, 2).sum() == load_X.sum()


def test_equal_loads_leave_every_expert_where_it_is():
    current = np.array([3, 0, 2, 1, 1, 3, 0, 2])
    assert balanced_placement(np.ones(8), 4, current).tolist() == current.tolist()


def test_never_worse_than_the_default_on_random_loads():
    rng = np.random.default_rng(0)
    for _ in range(200):
        ep = int(rng.choice([2, 4, 8]))
        load_X = rng.pareto(1.5, 16) * 100  # heavy-tailed, as top-k routing of a skewed composition
        balanced = balanced_placement(load_X, ep)
        assert (np.bincount(balanced, minlength=ep) == 16 // ep).all()
        assert max_over_mean(load_X, balanced, ep) <= max_over_mean(load_X, contiguous_placement(16, ep), ep) + 1e-12


def test_experts_that_do_not_split_evenly_are_refused():
    with pytest.raises(ValueError, match="6 experts do not split evenly over 4"):
        balanced_placement(np.ones(6), 4)
