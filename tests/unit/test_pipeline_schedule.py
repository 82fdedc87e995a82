"""The pipeline schedules and their simulator (exaforce.parallel.pipeline_schedule)."""

import pytest

from exaforce.parallel.pipeline_schedule import (DEFAULT_PHASE_COSTS, Op, choose_alive, folded, gpipe, lower_bound,
                                                 schedule, simulate)

EQUAL = (1.0, 1.0, 1.0, 1.0)


@pytest.mark.parametrize("pp, micro", [(2, 1), (2, 4), (3, 5), (4, 8), (8, 16)])
@pytest.mark.parametrize("costs", [EQUAL, DEFAULT_PHASE_COSTS])
def test_every_schedule_runs_every_op_once_and_no_sooner_than_the_bound(pp, micro, costs):
    for name in ("gpipe", "folded"):
        orders = schedule(name, pp, micro, costs=costs)
        every = sorted(Op(phase, m) for phase in (1, 2, 3, 4) for m in range(micro))
        assert all(sorted(order) == every for order in orders), name
        timeline = simulate(orders, costs)  # raises if an order waits on itself
        assert timeline.makespan >= lower_bound(pp, micro, costs) - 1e-9, name


def test_gpipe_bubble_is_the_textbook_one_on_equal_phases():
    pp, micro = 8, 16
    timeline = simulate(gpipe(pp, micro), EQUAL)
    assert timeline.makespan == pytest.approx(4 * (micro + pp - 1))
    assert timeline.bubble == pytest.approx((pp - 1) / (micro + pp - 1))
    assert timeline.peak_alive(0) == micro  # every micro-batch's graphs alive at once


def test_folded_reaches_the_bound_with_pp_alive_on_equal_phases():
    pp, micro = 8, 16
    timeline = simulate(folded(pp, micro, alive=pp, costs=EQUAL), EQUAL)
    assert timeline.makespan == pytest.approx(lower_bound(pp, micro, EQUAL))
    assert max(timeline.peak_alive(s) for s in range(pp)) <= pp
    assert timeline.makespan < simulate(gpipe(pp, micro), EQUAL).makespan / 1.15


@pytest.mark.parametrize("alive", [2, 3, 5])
def test_folded_keeps_at_most_alive_micro_batches_per_stage(alive):
    pp, micro = 4, 10
    timeline = simulate(folded(pp, micro, alive, DEFAULT_PHASE_COSTS), DEFAULT_PHASE_COSTS)
    assert max(timeline.peak_alive(s) for s in range(pp)) <= alive


def test_choose_alive_picks_a_bound_within_two_percent_of_the_fastest():
    pp, micro = 4, 12
    chosen = choose_alive(pp, micro, DEFAULT_PHASE_COSTS)
    spans = {k: simulate(folded(pp, micro, k, DEFAULT_PHASE_COSTS), DEFAULT_PHASE_COSTS).makespan
             for k in (pp, pp + 1, 3 * pp // 2, 2 * pp, micro)}  # the bounds it weighs
    assert chosen in spans and spans[chosen] <= min(spans.values()) * 1.02 + 1e-9
    assert all(spans[k] > min(spans.values()) * 1.02 for k in spans if k < chosen)  # the smallest such


def test_a_cyclic_order_is_reported_as_a_deadlock():
    # Stage 0 wants micro 0's force backward before micro 1's forward; stage 1 wants micro 1's forward first.
    orders = [[Op(1, 0), Op(2, 0), Op(1, 1), Op(2, 1)], [Op(1, 1), Op(1, 0), Op(2, 0), Op(2, 1)]]
    with pytest.raises(ValueError, match="deadlocks"):
        simulate(orders, EQUAL)


def test_an_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="parallel.pp_schedule = 'zb': must be one of folded, gpipe"):
        schedule("zb", 2, 2)
