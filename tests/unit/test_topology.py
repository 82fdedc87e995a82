import pytest

from exaforce.parallel.topology import TopologyError, grid_layout


def test_grid_groups():
    layout = grid_layout(8, dp=0, ep=4)
    assert layout.dp == 2
    assert layout.ep_group(5) == (4, 5, 6, 7)      # consecutive
    assert layout.edp_group(5) == (1, 5)           # strided
    assert (layout.dp_index(6), layout.ep_index(6)) == (1, 2)
    # Every rank is in exactly one EP group and one EDP group.
    assert sorted(r for g in {layout.ep_group(r) for r in range(8)} for r in g) == list(range(8))
    assert sorted(r for g in {layout.edp_group(r) for r in range(8)} for r in g) == list(range(8))


@pytest.mark.parametrize("world, dp, ep, message", [
    (4, 3, 1, "3 × 1 × 1 × 1 = 3 but the job has 4 ranks"),
    (6, 0, 4, "parallel.pp × parallel.gp × parallel.ep = 1 × 1 × 4 = 4 does not divide the world size 6"),
    (4, 0, 0, "need dp >= 0, pp >= 1, gp >= 1 and ep >= 1"),
])
def test_invalid_layouts(world, dp, ep, message):
    with pytest.raises(TopologyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        grid_layout(world, dp, ep)


def test_pipeline_grid_groups():
    """dp × pp × ep = 2 × 2 × 2: EP innermost, pipeline neighbours ep apart, replicas strided."""
    layout = grid_layout(8, dp=0, ep=2, pp=2)
    assert layout.dp == 2 and layout.replicas == 4
    assert [layout.pp_index(r) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert layout.ep_group(3) == (2, 3)
    assert layout.pp_group(4) == (4, 6)            # stage 0 then stage 1 of the same pipeline
    assert layout.pp_group(5) == (5, 7)
    assert layout.edp_group(5) == (1, 5)           # same stage and EP coordinate
    assert layout.stage_group(2) == (2, 3, 6, 7)   # every replica of stage 1
    # Both stages of a pipeline take the same share of the batch; the pipelines take different ones.
    assert {layout.replica_index(r) for r in layout.pp_group(5)} == {layout.replica_index(5)}
    assert sorted({layout.replica_index(r) for r in range(8)}) == [0, 1, 2, 3]
    for group in (layout.pp_group, layout.stage_group, layout.edp_group, layout.ep_group):
        assert sorted(r for g in {group(r) for r in range(8)} for r in g) == list(range(8))


@pytest.mark.parametrize("world, dp, pp, ep, message", [
    (4, 0, 3, 1, "parallel.pp × parallel.gp × parallel.ep = 3 × 1 × 1 = 3 does not divide the world size 4"),
    (4, 2, 2, 2, "2 × 2 × 1 × 2 = 8 but the job has 4 ranks"),
    (4, 0, 0, 1, "need dp >= 0, pp >= 1, gp >= 1 and ep >= 1"),
])
def test_invalid_pipeline_layouts(world, dp, pp, ep, message):
    with pytest.raises(TopologyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        grid_layout(world, dp, ep, pp)


def test_graph_parallel_grid_groups():
    """dp × gp × ep = 2 × 2 × 2: EP innermost, GP peers ep apart, both GP ranks take one share."""
    layout = grid_layout(8, dp=0, ep=2, gp=2)
    assert layout.dp == 2 and layout.replicas == 4
    assert [layout.gp_index(r) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert layout.ep_group(3) == (2, 3)
    assert layout.gp_group(5) == (5, 7)
    assert layout.edp_group(5) == (1, 3, 5, 7)     # same experts: every dp and gp index
    assert layout.stage_group(2) == tuple(range(8))
    assert {layout.replica_index(r) for r in layout.gp_group(5)} == {layout.replica_index(5)}
    assert sorted({layout.replica_index(r) for r in range(8)}) == [0, 1, 2, 3]
    for group in (layout.gp_group, layout.edp_group, layout.ep_group):
        assert sorted(r for g in {group(r) for r in range(8)} for r in g) == list(range(8))
    with pytest.raises(TopologyError, match="parallel.pp × parallel.gp × parallel.ep = 1 × 3 × 1 = 3 does not divide"):
        grid_layout(4, 0, 1, gp=3)
