"""The weights' moving average (optim.ema_decay): its arithmetic, exact swaps, the untouched frozen."""

from __future__ import annotations

import torch

from exaforce.training.ema import KEY, WeightAverage


def test_average_follows_the_warmed_up_decay_and_swaps_exactly():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    frozen = torch.nn.Parameter(torch.randn(3, dtype=torch.float64), requires_grad=False)
    optimizer = torch.optim.AdamW([p, frozen], lr=0.1)
    average = WeightAverage(optimizer, decay=0.9)
    expected = None
    for n in range(1, 30):
        p.grad = torch.randn_like(p)
        optimizer.step()
        average.update()
        d = min(0.9, (1 + n) / (10 + n))
        expected = p.detach().clone() if expected is None else d * expected + (1 - d) * p.detach()
        torch.testing.assert_close(optimizer.state[p][KEY], expected, rtol=1e-14, atol=1e-14)
    raw, averaged = p.detach().clone(), optimizer.state[p][KEY].clone()
    with average.averaged():
        assert torch.equal(p.detach(), averaged) and torch.equal(optimizer.state[p][KEY], raw)
    assert torch.equal(p.detach(), raw) and frozen not in optimizer.state
