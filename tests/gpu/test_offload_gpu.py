"""On a GPU (skipped without one; scripts/gpu-check.sh runs it on a lent GPU): experts offloaded to
pinned host memory with one resident per layer (exaforce.model.offload) give the float64 energies,
forces, stresses and parameter gradients of the model with every expert on the GPU (1e-10), the
expert weights stay on the host, and the device buffer's peak is one expert per layer."""

from __future__ import annotations

import copy

import pytest
import torch

from exaforce.config import ModelConfig
from exaforce.model.offload import offload_experts
from exaforce.model.potential import Potential

from test_gpu_equivalence import GPU, step_on

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA/ROCm device visible")]


def test_offloaded_experts_on_the_host_give_the_resident_numbers():
    torch.manual_seed(0)
    model = Potential(ModelConfig(width=16, blocks=2, elements=("Cu", "Au"), moe_experts=4, moe_top_k=2)).double()
    resident = step_on(model, GPU, None)
    offloaded_model = copy.deepcopy(model).to(GPU)
    offload = offload_experts(offloaded_model, 1, GPU)
    assert all(p.device.type == "cpu" and p.is_pinned() for layer in offloaded_model.moe_layers
               for p in layer.experts.parameters())
    with offload.scope():
        offloaded = step_on(offloaded_model, GPU, None, copy_model=False)
    (values, grads), (resident_values, resident_grads) = offloaded, resident
    for key, value in resident_values.items():
        torch.testing.assert_close(values[key], value, rtol=1e-10, atol=1e-10, msg=key)
    for name, grad in resident_grads.items():  # an expert the batch never routes to has none offloaded
        torch.testing.assert_close(grads.get(name, torch.zeros_like(grad)), grad, rtol=1e-10, atol=1e-12, msg=name)
    assert offload.step_done()["offload_peak_resident_experts"] == 1.0
