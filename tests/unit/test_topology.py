import pytest

from exaforce.parallel.topology import TopologyError, grid_layout


def test_grid_groups():
    layout = grid_layout(8, dp=0, ep=4)
    assert layout.dp == 2
    assert layout.ep_group(5) == (4, 5, 6, 7)      # consecutive
    assert layout.edp_group(5) == (1, 5)           # strided
    assert layout.coords(6) == (1, 2)
    # Every rank is in exactly one EP group and one EDP group.
    assert sorted(r for g in {layout.ep_group(r) for r in range(8)} for r in g) == list(range(8))
    assert sorted(r for g in {layout.edp_group(r) for r in range(8)} for r in g) == list(range(8))


@pytest.mark.parametrize("world, dp, ep, message", [
    (4, 3, 1, "3 × 1 = 3 but the job has 4 ranks"),
    (6, 0, 4, "parallel.ep = 4 does not divide the world size 6"),
    (4, 0, 0, "need dp >= 0 and ep >= 1"),
])
def test_invalid_layouts(world, dp, ep, message):
    with pytest.raises(TopologyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        grid_layout(world, dp, ep)
