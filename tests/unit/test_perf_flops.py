"""exaforce.perf.flops: FlopCounterMode totals and the linear FLOP model in atoms, edges, angles."""

from __future__ import annotations

import pytest
import torch

from exaforce.perf.flops import count_flops, fit_flop_coefficients, predict_flops

pytestmark = pytest.mark.perf


def test_count_flops_of_a_matmul():
    a, b = torch.randn(7, 5), torch.randn(5, 3)
    assert count_flops(lambda: a @ b) == 2 * 7 * 3 * 5


def test_fit_recovers_exact_coefficients():
    true = {"const": 1234.0, "atoms": 56.0, "edges": 7.5, "angles": 0.25}
    counts = [(10, 200, 3000), (20, 150, 1000), (15, 400, 2500), (40, 300, 9000), (33, 123, 456)]
    samples = [(n, e, t, predict_flops(true, n, e, t)) for n, e, t in counts]
    fitted = fit_flop_coefficients(samples)
    assert fitted == {k: pytest.approx(v, rel=1e-9) for k, v in true.items()}


def test_fit_rejects_too_few_or_degenerate_samples():
    with pytest.raises(ValueError, match="at least 4 samples"):
        fit_flop_coefficients([(1, 2, 3, 4.0)] * 3)
    collinear = [(n, 12 * n, 5 * n + 7 * (n % 3), 100.0 * n) for n in (1, 2, 3, 4, 5)]  # edges = 12·atoms
    with pytest.raises(ValueError, match="degenerate calibration.*span only 3 of 4"):
        fit_flop_coefficients(collinear)
    no_angles = [(n, e, 0, 1.0) for n, e in ((1, 5), (2, 3), (4, 9), (7, 1))]
    with pytest.raises(ValueError, match="'angles' is zero in every sample"):
        fit_flop_coefficients(no_angles)


D = 16  # channels of the toy model


def _toy_step_flops(atoms: int, edges: int, angles: int) -> int:
    """FLOPs of a toy training step whose matmuls act on atom, edge and angle rows, with a force
    term (autograd.grad, create_graph=True) and a parameter backward, as in a real step."""
    gen = torch.Generator().manual_seed(atoms * 1_000_003 + edges * 1_009 + angles)
    w_in = torch.randn(D, D, generator=gen, requires_grad=True)
    w_out = torch.randn(D, 1, generator=gen, requires_grad=True)
    pos_N3 = torch.randn(atoms, 3, generator=gen, requires_grad=True)
    embed_3D = torch.randn(3, D, generator=gen)
    edge_ED = torch.randn(edges, D, generator=gen)
    angle_TD = torch.randn(angles, D, generator=gen)
    src_E = torch.randint(0, atoms, (edges,), generator=gen)
    src_T = torch.randint(0, edges, (angles,), generator=gen)

    def step():
        node_ND = torch.tanh(pos_N3 @ embed_3D)                       # atom rows
        edge_msg_ED = torch.tanh((edge_ED + node_ND[src_E]) @ w_in)    # edge rows
        angle_msg_TD = torch.tanh((angle_TD + edge_msg_ED[src_T]) @ w_in @ w_in)  # angle rows
        edge_ED2 = edge_msg_ED.index_add(0, src_T, angle_msg_TD)
        node_ND2 = node_ND.index_add(0, src_E, edge_ED2) @ w_in
        energy = (node_ND2 @ w_out).sum() + (w_in @ w_in).sum()        # constant-cost term
        (forces_N3,) = torch.autograd.grad(energy, pos_N3, create_graph=True)
        loss = energy.square() + forces_N3.square().sum()
        loss.backward()

    return count_flops(step)


def test_fitted_coefficients_predict_held_out_counter_within_1_percent():
    calibration = [(8, 40, 90), (12, 30, 150), (20, 90, 60), (5, 70, 200), (16, 55, 110), (25, 20, 30)]
    samples = [(n, e, t, _toy_step_flops(n, e, t)) for n, e, t in calibration]
    coeffs = fit_flop_coefficients(samples)
    assert all(coeffs[k] > 0 for k in ("atoms", "edges", "angles"))
    held_out = (64, 700, 2100)  # well outside the calibration range
    counted = _toy_step_flops(*held_out)
    assert predict_flops(coeffs, *held_out) == pytest.approx(counted, rel=0.01)


@pytest.mark.parametrize("preset", ["small", "small-moe"])
def test_trainer_calibration_predicts_the_real_step_within_1_percent(preset):
    """The trainer's own calibration (six batches of 1-5 structures, as train() uses) predicts the
    counter on held-out batches of other sizes: forward, forces/stress with create_graph, parameter
    backward of the real model (dense and MoE)."""
    from exaforce.comm.groups import build_groups
    from exaforce.config import Config, DataConfig, model_preset
    from exaforce.graph import build_batch
    from exaforce.io.schema import Frames
    from exaforce.io.synth import synthesize
    from exaforce.model.potential import Potential
    from exaforce.parallel.parallelize import parallelize
    from exaforce.parallel.topology import Topology
    from exaforce.training.calibrate import calibrate_flops
    from exaforce.training.step import loss_and_gradients

    cfg = Config(model=model_preset(preset), data=DataConfig(train=("unused",)))
    torch.manual_seed(0)
    model = Potential(cfg.model).double()
    topo = Topology.from_mpi(dp=1, ep=1)
    parallel = parallelize(model, topo, build_groups(cfg.comm.backend, topo), cfg)
    structures = synthesize(40, seed=3)

    def batch(first: int, count: int):
        frames = Frames.from_atoms(structures[first:first + count])
        return build_batch(frames, model.species_table(), cfg.model.cutoff, cfg.model.three_body_cutoff).to("cpu", torch.float64)

    calibration = [batch(i, k) for i, k in ((0, 1), (1, 2), (3, 3), (6, 4), (10, 2), (12, 5))]
    coeffs, determined = calibrate_flops(model, calibration, cfg, parallel, print)
    assert determined
    for held_out in (batch(17, 8), batch(25, 12)):
        routing = parallel.routing(model, held_out)
        counted = count_flops(lambda: loss_and_gradients(model, held_out, cfg, 1.0, {}, routing))
        c = held_out.counts()
        predicted = predict_flops(coeffs, c["atoms"], c["edges"], c["angles"])
        assert predicted == pytest.approx(counted, rel=0.01), (c, predicted, counted)
