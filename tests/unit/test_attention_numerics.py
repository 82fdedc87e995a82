"""The weighted softmax stays finite for every weight pattern, in float32, on both paths.

A line at its cutoff has weight 0. Before the fix the segment max was taken over scores alone, so
a weight-0 line scoring ~90 above the others pushed every exp(z − m) of the weighted lines to 0
and exp(−m) too: 0/0 in the message and NaN in its gradients.
"""

from __future__ import annotations

import pytest
import torch

from exaforce.model.blocks import SeparableAttention
from exaforce.model.recompute import Recompute

WIDTH = 2


def attention(dtype: torch.dtype) -> SeparableAttention:
    """Scores = the line's one feature (both directions), gates 0, values 1: the weights and the
    line features alone decide the softmax."""
    layer = SeparableAttention(WIDTH, line_dim=1).to(dtype)
    with torch.no_grad():
        layer.entity_proj.weight.zero_()
        layer.entity_proj.bias.copy_(torch.tensor([0, 0, 0, 0, 1, 0, 0, 0, 0, 1], dtype=dtype).repeat_interleave(WIDTH))
        layer.line_proj.weight.copy_(torch.tensor([1, 0, 1, 0], dtype=dtype).repeat_interleave(WIDTH)[:, None])
    return layer


# Three lines into entity 0 (from entities 1, 2, 3): (scores, weights).
PATTERNS = {
    "top line at its cutoff, the rest 90 below": ([100.0, 10.0, 10.0], [0.0, 1.0, 0.5]),
    "top line at its cutoff, the rest 200 below": ([100.0, -100.0, -100.0], [0.0, 1.0, 1.0]),
    "every weight 0": ([100.0, 10.0, -50.0], [0.0, 0.0, 0.0]),
    "subnormal weights": ([100.0, 99.0, 10.0], [1e-44, 1e-40, 1.0]),
    "weights just above 0 at high score": ([120.0, 0.0, 0.0], [1e-30, 1.0, 1.0]),
}


def message_and_grads(dtype: torch.dtype, scores: list[float], weights: list[float], fused: bool):
    layer = attention(dtype)
    entity_SD = torch.zeros(4, WIDTH, dtype=dtype, requires_grad=True)
    line_XF = torch.tensor(scores, dtype=dtype)[:, None].requires_grad_(True)
    weight_X = torch.tensor(weights, dtype=dtype).requires_grad_(True)
    index_2X = torch.tensor([[0, 0, 0], [1, 2, 3]])
    plan = Recompute(lines=2) if fused else None
    message = layer(entity_SD, line_XF, weight_X, index_2X, plan)
    # The force backward (create_graph) and the loss backward through it, as training does.
    grads = torch.autograd.grad((message * torch.arange(1.0, 1 + message.numel(), dtype=dtype).view_as(message)).sum(),
                                (entity_SD, line_XF, weight_X), create_graph=True)
    second = sum(g.pow(2).sum() for g in grads)
    second.backward()
    return message.detach(), [g.detach() for g in grads], [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_finite_for_every_weight_pattern_in_float32(pattern: str, fused: bool) -> None:
    scores, weights = PATTERNS[pattern]
    message, grads, param_grads = message_and_grads(torch.float32, scores, weights, fused)
    for name, t in [("message", message), *[(f"grad {i}", g) for i, g in enumerate(grads)],
                    *[(f"parameter grad {i}", g) for i, g in enumerate(param_grads)]]:
        assert torch.isfinite(t).all(), f"{pattern}: {name} not finite: {t}"


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("pattern", ["top line at its cutoff, the rest 90 below", "every weight 0"])
def test_float32_message_matches_float64(pattern: str, fused: bool) -> None:
    scores, weights = PATTERNS[pattern]
    m32, g32, _ = message_and_grads(torch.float32, scores, weights, fused)
    m64, g64, _ = message_and_grads(torch.float64, scores, weights, fused)
    torch.testing.assert_close(m32.double(), m64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g32[0].double(), g64[0], rtol=1e-4, atol=1e-6)  # entity gradient


def test_capped_lines_plain_and_fused_agree_in_float64() -> None:
    """A line below the weight floor scoring far above the rest has its exponent capped: the fused
    op's hand-written derivatives (first and second order) must equal autograd through the plain path."""
    torch.manual_seed(0)
    layer = SeparableAttention(WIDTH, line_dim=2).double()
    with torch.no_grad():  # feature 0 adds to both directions' scores
        layer.line_proj.weight[:, 0] = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64).repeat_interleave(WIDTH)
    entity_SD = torch.randn(4, WIDTH, dtype=torch.float64)
    line_XF = torch.stack([torch.tensor([100.0, 10.0, 12.0], dtype=torch.float64), torch.randn(3, dtype=torch.float64)], 1)
    weight_X = torch.tensor([1e-20, 1.0, 0.5], dtype=torch.float64)
    index_2X = torch.tensor([[0, 0, 0], [1, 2, 3]])
    results = []
    for plan in (None, Recompute(lines=2)):
        layer.zero_grad()
        inputs = [t.clone().requires_grad_(True) for t in (entity_SD, line_XF, weight_X)]
        message = layer(*inputs, index_2X, plan)
        grads = torch.autograd.grad((message * torch.arange(1.0, 1 + message.numel(), dtype=torch.float64
                                                            ).view_as(message)).sum(), inputs, create_graph=True)
        (grads[0].pow(2).sum() + grads[1].pow(2).sum()).backward()  # the capped line's w-gradient (~e^30) left out
        results.append([message.detach(), *[g.detach() for g in grads], *[t.grad for t in inputs],
                        *[p.grad.clone() for p in layer.parameters()]])
    assert results[0][3][0] != 0  # the capped line's weight has a gradient (through its capped exponent)
    for plain, fused in zip(*results):  # terms of size e^30 cancel: rounding reaches ~1e-11 of the largest
        torch.testing.assert_close(fused, plain, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_random_weight_patterns_stay_finite_in_float32(seed: int) -> None:
    """Many segments, scores spread over ±150, weights drawn from {0, subnormal, 1e-20, 1e-10, U(0, 1)}."""
    generator = torch.Generator().manual_seed(seed)
    n_entities, n_lines = 6, 40
    layer = attention(torch.float32)
    choices = torch.tensor([0.0, 1e-42, 1e-20, 1e-10, 0.5, 1.0])
    weight_X = choices[torch.randint(len(choices), (n_lines,), generator=generator)]
    weight_X = torch.where(weight_X == 0.5, torch.rand(n_lines, generator=generator), weight_X)
    line_XF = (torch.rand(n_lines, 1, generator=generator) * 300 - 150)
    index_2X = torch.randint(n_entities, (2, n_lines), generator=generator)
    for plan in (None, Recompute(lines=7)):
        entity_SD = torch.zeros(n_entities, WIDTH, requires_grad=True)
        inputs = (entity_SD, line_XF.clone().requires_grad_(True), weight_X.clone().requires_grad_(True))
        message = layer(*inputs, index_2X, plan)
        grads = torch.autograd.grad(message.sum(), inputs, create_graph=True)
        sum(g.pow(2).sum() for g in grads).backward()
        assert torch.isfinite(message).all() and all(torch.isfinite(g).all() for g in grads)
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
