"""Expert offload (parallel.resident_experts, exaforce.model.offload): experts stay on the host and at
most `budget` per layer are on the device at a time, through the forward, the force backward
(create_graph) and the loss's backward, with the numbers of resident experts: float64 energies,
forces, stresses and every parameter gradient equal to 1e-12, plain and fused (recomputing) paths.
The mechanism runs here; on this CPU-only machine the "device" copy is a separate buffer in the
same memory, so its bookkeeping is what is tested."""

from __future__ import annotations

import pytest
import torch
from ase.build import bulk

from exaforce.config import ModelConfig
from exaforce.graph import batch_from_atoms
from exaforce.model.offload import offload_experts
from exaforce.model.potential import Potential, energy, forces_and_stress, local_routing, strained_geometry
from exaforce.model.recompute import Recompute

pytestmark = pytest.mark.physics


def step(model: Potential, plan: Recompute | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    cells = []
    for k, other in enumerate((79, 46)):  # three elements: each layer routes to several experts
        atoms = bulk("Cu", "fcc", a=3.7, cubic=True).repeat((2, 1, 1))
        atoms.numbers[[1, 4 + k]] = other
        atoms.rattle(0.08, seed=k)
        cells.append(atoms)
    batch = batch_from_atoms(cells, model.species_table(), model.cfg.cutoff,
                             model.cfg.three_body_cutoff).to("cpu", torch.float64)
    model.zero_grad(set_to_none=True)
    with model.offload.scope() if model.offload is not None else torch.autograd.graph.saved_tensors_hooks(
            lambda t: t, lambda t: t):
        routing = local_routing(model, batch)
        geometry = strained_geometry(batch)
        pred = forces_and_stress(energy(model, batch, geometry, routing, plan), geometry, batch, training=True)
        loss = (pred.energy_G - 1.0).pow(2).sum() + 3 * pred.forces_N3.pow(2).sum() + 5 * pred.stress_G6.pow(2).sum()
        loss.backward()
    values = [pred.energy_G.detach(), pred.forces_N3.detach(), pred.stress_G6.detach()]
    return values, [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


@pytest.mark.parametrize("plan", [None, Recompute(700, True, 300)], ids=["plain", "fused"])
def test_one_resident_expert_per_layer_gives_the_resident_numbers(plan):
    cfg = ModelConfig(width=16, blocks=2, elements=("Cu", "Au", "Pd"), moe_experts=4, moe_top_k=2)
    torch.manual_seed(0)
    model = Potential(cfg).double()
    values, grads = step(model, plan)
    offload = offload_experts(model, 1, torch.device("cpu"))
    offloaded, offloaded_grads = step(model, plan)
    for a, b in zip(offloaded + offloaded_grads, values + grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    stats = offload.step_done()
    expert_bytes = offload.buffers[0].expert_bytes
    assert stats["offload_peak_resident_experts"] == 1.0  # never two experts' weights at once, in any layer
    assert stats["offload_fetched_bytes"] > 4 * expert_bytes  # fetched again for each backward that needs them
    assert all(not b.cache for b in offload.buffers)  # emptied for the next step's weights


def test_the_plan_prefetches_a_layers_first_experts_before_its_dispatch():
    """Each MoE layer asks its buffer for its first `budget` experts with rows before its dispatch
    all-to-all (on an accelerator their copies then overlap it): at the dispatch they are resident."""
    cfg = ModelConfig(width=16, blocks=2, elements=("Cu", "Au", "Pd"), moe_experts=4, moe_top_k=2)
    torch.manual_seed(0)
    model = Potential(cfg).double()
    offload = offload_experts(model, 2, torch.device("cpu"))
    seen = []
    for layer in model.moe_layers:
        def spy(x, route, clock, layer=layer, dispatch=layer.dispatcher.dispatch):
            first = [int(e) for e, rows in zip(layer.experts, route.expert_rows) if rows][:2]
            seen.append((first, list(layer.offload.cache)))
            return dispatch(x, route, clock)
        layer.dispatcher.dispatch = spy
    step(model, None)
    assert len(seen) == len(model.moe_layers) and all(len(first) == 2 for first, _ in seen)
    assert all(set(first) <= set(resident) and len(resident) <= 2 for first, resident in seen)
    assert offload.step_done()["offload_peak_resident_experts"] <= 2.0


def test_a_budget_of_zero_is_refused():
    model = Potential(ModelConfig(width=8, blocks=1, elements=("Cu",), moe_experts=2, moe_top_k=1))
    with pytest.raises(ValueError, match="resident_experts = 0: must be >= 1"):
        offload_experts(model, 0, torch.device("cpu"))
