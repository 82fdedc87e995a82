"""The memory-saving training path (run.recompute_lines > 0: fused attention, recomputed bond
update) is exact: it gives the plain path's energies, forces, stresses and parameter gradients of
a force-and-stress loss, through the double backward, to 1e-12 in float64 — dense and MoE models,
one chunk or many — and the fused op's hand-written derivatives are the true ones."""

from __future__ import annotations

import pytest
import torch
from ase.build import bulk

from exaforce.config import ModelConfig
from exaforce.graph import batch_from_atoms
from exaforce.model.blocks import SeparableAttention
from exaforce.model.fused_attention import Inputs, Scratch, fused_segment_sums
from exaforce.model.potential import Potential, energy, forces_and_stress, local_routing, strained_geometry
from exaforce.model.recompute import Recompute, recompute

pytestmark = pytest.mark.physics


def alloy_cells() -> list:
    cells = []
    for k in range(2):
        atoms = bulk("Cu", "fcc", a=3.7, cubic=True).repeat((2, 1, 1))
        atoms.numbers[[1, 4 + k]] = 79
        atoms.rattle(0.08, seed=k)
        cells.append(atoms)
    return cells


def loss_and_grads(model: Potential, plan: Recompute | None) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    batch = batch_from_atoms(alloy_cells(), model.species_table(), model.cfg.cutoff,
                             model.cfg.three_body_cutoff).to("cpu", torch.float64)
    routing = local_routing(model, batch) if model.moe_layers else None
    model.zero_grad(set_to_none=True)
    geometry = strained_geometry(batch)
    pred = forces_and_stress(energy(model, batch, geometry, routing, plan), geometry, batch, training=True)
    target_N3 = torch.linspace(-1, 1, pred.forces_N3.numel(), dtype=torch.float64).reshape(-1, 3)
    loss = (pred.energy_G - 1.0).pow(2).sum() + 3 * (pred.forces_N3 - target_N3).pow(2).sum() \
        + 5 * pred.stress_G6.pow(2).sum()
    if model.moe_layers:
        loss = loss + model.aux_loss(routing)
    loss.backward()
    values = {"energy": pred.energy_G.detach(), "forces": pred.forces_N3.detach(), "stress": pred.stress_G6.detach()}
    return values, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("chunk", [700, 100_000], ids=["many-chunks", "one-chunk"])
@pytest.mark.parametrize("bonds", [True, False], ids=["bonds-recomputed", "bond-sums-stored"])
def test_recomputed_step_equals_stored_step(moe, chunk, bonds):
    """Many chunks also recompute the triplets' geometry features in units of 300 triplets."""
    cfg = ModelConfig(width=16, blocks=2, elements=("Cu", "Au"), moe_experts=4 if moe else 0, moe_top_k=2)
    torch.manual_seed(0)
    model = Potential(cfg).double()
    stored, stored_grads = loss_and_grads(model, None)
    recomputed, recomputed_grads = loss_and_grads(model, Recompute(chunk, bonds, 300 if chunk < 1000 else 0))
    for key, value in stored.items():
        torch.testing.assert_close(recomputed[key], value, rtol=0, atol=1e-12, msg=key)
    assert len(stored_grads) == len(recomputed_grads) == len(list(model.parameters()))
    for (name, _), a, b in zip(model.named_parameters(), recomputed_grads, stored_grads):
        scale = max(float(b.abs().max()), 1.0)
        assert float((a - b).abs().max()) <= 1e-12 * scale, name


@pytest.mark.parametrize("bonds", [True, False], ids=["bonds-recomputed", "bond-sums-stored"])
def test_a_narrow_line_graph_recomputed_equals_stored(bonds):
    """model.line_width below width: the fused op takes its lines' channels from its weights."""
    torch.manual_seed(0)
    model = Potential(ModelConfig(width=16, line_width=8, blocks=2, elements=("Cu", "Au"))).double()
    assert model.blocks[0].line_attention.entity_proj.weight.shape == (80, 16)
    stored, stored_grads = loss_and_grads(model, None)
    recomputed, recomputed_grads = loss_and_grads(model, Recompute(700, bonds, 300))
    for key, value in stored.items():
        torch.testing.assert_close(recomputed[key], value, rtol=0, atol=1e-12, msg=key)
    for (name, _), a, b in zip(model.named_parameters(), recomputed_grads, stored_grads):
        assert float((a - b).abs().max()) <= 1e-12 * max(float(b.abs().max()), 1.0), name


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_inference_takes_the_lean_path_above_its_limit_and_equals_the_plain_one(monkeypatch, moe):
    """Inference above LEAN_INFERENCE_ABOVE (MoE models: always, since the fused path re-issues the
    expert all-to-alls and every rank must take the same path): fused attentions, stored bond sums,
    the geometry features recomputed in units (here of 500 triplets, several per cell); energies,
    forces and stresses equal plain autograd's to 1e-12 in float64."""
    import exaforce.model.potential as potential

    torch.manual_seed(0)
    model = Potential(ModelConfig(width=16, blocks=2, elements=("Cu", "Au"),
                                  moe_experts=4 if moe else 0, moe_top_k=2)).double()
    batch = batch_from_atoms(alloy_cells(), model.species_table(), model.cfg.cutoff,
                             model.cfg.three_body_cutoff).to("cpu", torch.float64)
    routing = local_routing(model, batch) if moe else None
    geometry = strained_geometry(batch)
    plain = forces_and_stress(energy(model, batch, geometry, routing, None), geometry, batch, training=False)
    monkeypatch.setattr(potential, "INFERENCE_GEOMETRY_LINES", 500)
    if not moe:
        assert potential.inference_plan(model, batch) is None  # small: the plain path
        monkeypatch.setattr(potential, "LEAN_INFERENCE_ABOVE", 0)
    assert potential.inference_plan(model, batch) == Recompute(potential.INFERENCE_CHUNK_LINES, False, 500)
    assert batch.triplet_index_2T.shape[1] > 2 * 500
    lean = potential.energy_forces_stress(model, batch, training=False, routing=routing)
    for key in ("energy_G", "forces_N3", "stress_G6"):
        torch.testing.assert_close(getattr(lean, key), getattr(plain, key), rtol=0, atol=1e-12, msg=key)


def test_recompute_second_derivatives_match_finite_differences():
    """gradgradcheck: the recorded force backward of a unit, and its own backward, are the true
    first and second derivatives (of the inputs, a parameter and the incoming gradient)."""
    weight = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)

    def unit(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(x @ weight) * y
        return h.exp().sum(0, keepdim=True), h.sin()

    def recomputed(x, y, w):
        assert w is weight
        return recompute(unit, (x, y), [w])

    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(recomputed, (x, y, weight))
    assert torch.autograd.gradgradcheck(recomputed, (x, y, weight))


def attention_inputs(n_entities: int = 6, width: int = 3, n_features: int = 4, n_lines: int = 29):
    generator = torch.Generator().manual_seed(1)
    entity = torch.randn(n_entities, width, dtype=torch.float64, generator=generator, requires_grad=True)
    line = torch.randn(n_lines, n_features, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.rand(n_lines, dtype=torch.float64, generator=generator).requires_grad_(True)
    index = torch.randint(0, n_entities, (2, n_lines), generator=generator)
    return entity, line, weight, index


def test_fused_attention_derivatives_match_finite_differences():
    """gradcheck / gradgradcheck of the message through the fused op (chunks of 7 lines): its vjp
    and the vjp's vjp are the true first and second derivatives in the entities, the line features,
    the line weights and every projection weight."""
    entity, line, weight, index = attention_inputs()
    attention = SeparableAttention(3, 4).double()
    entity_proj, line_proj = attention.entity_proj, attention.line_proj

    def message(entity, line, weight, entity_weight, entity_bias, line_weight):
        inputs = Inputs(entity, entity_weight, entity_bias, line, line_weight, weight, index)
        return SeparableAttention.message(fused_segment_sums(inputs, 7, Scratch()))

    params = (entity_proj.weight, entity_proj.bias, line_proj.weight)
    assert torch.autograd.gradcheck(message, (entity, line, weight, *params))
    # A create_graph backward drops the weights' first-order gradients by design (see the module),
    # so the second derivatives are checked in the other inputs here and in the weights below.
    assert torch.autograd.gradgradcheck(lambda e, x, w: message(e, x, w, *(p.detach() for p in params)),
                                        (entity, line, weight))


@pytest.mark.parametrize("chunk", [5, 1000])
def test_fused_attention_double_backward_equals_autograd(chunk):
    """A force-like loss through the fused attention (d⟨message³⟩/d inputs, squared) gives the plain
    autograd path's parameter and input gradients to 1e-12 in float64, chunked or not."""
    entity, line, weight, index = attention_inputs(n_lines=41)
    torch.manual_seed(0)
    attention = SeparableAttention(3, 4).double()

    def gradients(plan: Recompute | None) -> list[torch.Tensor]:
        leaves = (entity, line, weight)
        message = attention(entity, line, weight, index, plan)
        first = torch.autograd.grad(message.pow(3).sum(), leaves, create_graph=True)
        loss = sum(g.pow(2).sum() for g in first) + message.pow(2).sum()
        return list(torch.autograd.grad(loss, (*leaves, *attention.parameters())))

    for plain, fused in zip(gradients(None), gradients(Recompute(chunk))):
        torch.testing.assert_close(fused, plain, rtol=0, atol=1e-12 * max(float(plain.abs().max()), 1.0))


def test_scratch_projection_is_recomputed_after_an_in_place_change():
    """The parts buffer is reused only while its inputs are unchanged: versions recorded when it was
    filled (a live read would share the counter and never see the change)."""
    scratch = Scratch()
    entity, weight, bias = torch.randn(5, 4), torch.randn(40, 4), torch.randn(40)
    before = scratch.projection(entity, weight, bias).clone()
    with torch.no_grad():
        weight.add_(1.0)
    after = scratch.projection(entity, weight, bias)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, torch.addmm(bias, entity, weight.T), rtol=0, atol=0)


def test_the_step_stores_everything_for_small_line_graphs_of_dense_models():
    """run.store_all_below: the plain path for a micro-batch whose triplets × line width × blocks is below
    it (dense models), the configured fused path above it, and always for MoE models (whose fused
    path issues all-to-alls while it recomputes: every rank must take the same path)."""
    from exaforce.config import Config, RunConfig
    from exaforce.training.step import step_plan

    dense = Potential(ModelConfig(width=16, blocks=2, elements=("Cu", "Au")))
    moe = Potential(ModelConfig(width=16, blocks=2, elements=("Cu", "Au"), moe_experts=4, moe_top_k=2))
    batch = batch_from_atoms(alloy_cells(), dense.species_table(), 5.0, 3.2)
    line_channels = batch.triplet_index_2T.shape[1] * 16 * 2
    at = lambda below, lines=4096: Config(run=RunConfig(store_all_below=below, recompute_lines=lines))  # noqa: E731
    assert step_plan(dense, batch, at(line_channels + 1)) is None                     # small: stored
    fused = Recompute(4096, True, release_host_memory=True)  # on the CPU, run.release_host_memory's default
    assert step_plan(dense, batch, at(line_channels)) == fused                         # at the limit: fused
    assert step_plan(dense, batch, at(0)) == fused                                     # 0: never stored
    assert step_plan(moe, batch, at(10**12)) == fused                                  # MoE: as configured
    assert step_plan(dense, batch, at(0, lines=0)) is None                            # recompute_lines 0: plain
    narrow = Potential(ModelConfig(width=16, line_width=4, blocks=2, elements=("Cu", "Au")))  # 4 channels a line
    assert step_plan(narrow, batch, at(line_channels // 4 + 1)) is None
    assert step_plan(narrow, batch, at(line_channels // 4)) == fused


def test_calibration_takes_the_path_of_a_typical_training_micro_batch():
    """Calibration batches hold 1-5 structures; their plan follows the training micro-batch (global
    batch / ranks / micro-batches), not their own size, so the coefficients describe the steps."""
    import numpy as np

    from exaforce.config import Config, DataConfig, RunConfig
    from exaforce.training.calibrate import on_training_path
    from exaforce.training.data import GlobalIndex

    dense = Potential(ModelConfig(width=16, blocks=2, elements=("Cu", "Au")))
    n = 10
    index = GlobalIndex(dataset_G=np.zeros(n, int), local_G=np.arange(n), head_G=np.zeros(n, int),
                        counts_G3=np.tile([50, 2000, 6000], (n, 1)), is_val_G=np.zeros(n, bool), weight_G=np.ones(n))
    cfg = lambda batch: Config(run=RunConfig(store_all_below=2**23), data=DataConfig(global_batch_size=batch))  # noqa: E731
    # 6000 triplets × 16 × 2 = 192k line-channels per structure: 8 per rank → 1.5M (plain), 128 → 24.6M (fused)
    assert on_training_path(cfg(16), dense, index, 2).run.store_all_below == 2**62
    assert on_training_path(cfg(256), dense, index, 2).run.store_all_below == 0


def test_the_fused_step_releases_freed_host_memory_in_both_backwards_and_keeps_its_numbers(monkeypatch):
    """run.release_host_memory: the heap is trimmed in the force backward and in the loss's backward
    (where each recomputed unit and fused pass has freed the previous one's graph), never without
    the flag, and the numbers are the same."""
    import exaforce.model.recompute as recompute_module

    phase, calls = ["forward and force backward"], []
    monkeypatch.setattr(recompute_module, "release_freed_host_memory", lambda: calls.append(phase[0]))

    original = forces_and_stress

    def then_the_loss_backward(*args, **kwargs):  # loss_and_grads: forces_and_stress, then loss.backward()
        result = original(*args, **kwargs)
        phase[0] = "loss backward"
        return result

    monkeypatch.setitem(globals(), "forces_and_stress", then_the_loss_backward)
    cfg = ModelConfig(width=16, blocks=2, elements=("Cu", "Au"))
    torch.manual_seed(0)
    model = Potential(cfg).double()
    kept, kept_grads = loss_and_grads(model, Recompute(700, True))
    assert calls == []
    phase[0] = "forward and force backward"
    released, released_grads = loss_and_grads(model, Recompute(700, True, release_host_memory=True))
    # per block at least the bond unit and the atom attention in each backward
    assert calls.count("forward and force backward") >= 2 * cfg.blocks, calls
    assert calls.count("loss backward") >= 2 * cfg.blocks, calls
    for key, value in kept.items():
        torch.testing.assert_close(released[key], value, rtol=0, atol=0, msg=key)
    for a, b in zip(released_grads, kept_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
