"""On a GPU (skipped without one; scripts/gpu-check.sh runs these on a lent GPU): the float64
training step on the device equals the CPU's — energies, forces, stresses and every parameter
gradient of a force-and-stress loss through the double backward, to 1e-10 — for the plain and the
fused (memory-saving) path, dense and MoE; and the ASE calculator gives the CPU's forces."""

from __future__ import annotations

import copy

import pytest
import torch
from ase.build import bulk

from exaforce.calculator import ExaforceCalculator
from exaforce.config import ModelConfig
from exaforce.device import to_device
from exaforce.graph import batch_from_atoms
from exaforce.model.potential import Potential, energy, forces_and_stress, local_routing, strained_geometry
from exaforce.model.recompute import Recompute

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA/ROCm device visible")]
GPU = torch.device("cuda", 0)


def cells() -> list:
    out = []
    for k, lattice in enumerate(("fcc", "bcc")):
        atoms = bulk("Cu", lattice, a=3.6 if lattice == "fcc" else 2.9, cubic=True).repeat((2, 2, 2))
        atoms.numbers[[1, 5 + k]] = 79
        atoms.rattle(0.08, seed=k)
        out.append(atoms)
    return out


def step_on(model: Potential, device: torch.device, plan: Recompute | None, copy_model: bool = True):
    """(energies, forces, stresses) and the parameter gradients of a copy of `model` on `device`
    (`copy_model` False: of `model` itself, already there)."""
    if copy_model:
        model = copy.deepcopy(model).to(device)
    batch = to_device(batch_from_atoms(cells(), model.species_table(), model.cfg.cutoff, model.cfg.three_body_cutoff),
                      device, torch.float64)
    routing = local_routing(model, batch) if model.moe_layers else None
    geometry = strained_geometry(batch)
    pred = forces_and_stress(energy(model, batch, geometry, routing, plan), geometry, batch, training=True)
    target_N3 = torch.linspace(-1, 1, pred.forces_N3.numel(), dtype=torch.float64, device=device).reshape(-1, 3)
    loss = (pred.energy_G - 1.0).pow(2).sum() + 3 * (pred.forces_N3 - target_N3).pow(2).sum() \
        + 5 * pred.stress_G6.pow(2).sum()
    if model.moe_layers:
        loss = loss + model.aux_loss(routing)
    loss.backward()
    values = {"energy": pred.energy_G, "forces": pred.forces_N3, "stress": pred.stress_G6}
    return ({k: v.detach().cpu() for k, v in values.items()},
            {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None})


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("plan", [None, Recompute(512, True)], ids=["plain", "fused"])
def test_float64_step_on_the_gpu_equals_the_cpu(moe, plan):
    cfg = ModelConfig(width=32, blocks=2, elements=("Cu", "Au"), moe_experts=4 if moe else 0, moe_top_k=2)
    torch.manual_seed(0)
    model = Potential(cfg).double()
    cpu_values, cpu_grads = step_on(model, torch.device("cpu"), plan)
    gpu_values, gpu_grads = step_on(model, GPU, plan)
    for key, value in cpu_values.items():
        torch.testing.assert_close(gpu_values[key], value, rtol=1e-10, atol=1e-10, msg=key)
    assert gpu_grads.keys() == cpu_grads.keys() and len(cpu_grads) > 10
    for name, grad in cpu_grads.items():
        torch.testing.assert_close(gpu_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_calculator_on_the_gpu_gives_the_cpu_forces():
    atoms = cells()[0]
    on_cpu = ExaforceCalculator.from_preset("small", seed=0, dtype="float64", device="cpu")
    on_gpu = ExaforceCalculator.from_preset("small", seed=0, dtype="float64", device="auto")
    assert on_gpu.device.type == "cuda"
    forces_cpu = on_cpu.get_forces(atoms.copy())
    forces_gpu = on_gpu.get_forces(atoms.copy())
    assert abs(forces_gpu - forces_cpu).max() < 1e-10
