"""An exponential moving average of the weights (optim.ema_decay), for evaluation and checkpoints.

Why: with a high learning rate the weights jitter around the minimum; their average sits nearer
it, so potentials are evaluated and shipped with averaged weights (MACE, NequIP and fairchem do
the same). The warm-up min(decay, (1 + n)/(10 + n)) after n updates keeps the first steps' random
weights from lingering.

The average lives in the optimizer's per-parameter state (key "ema"), so checkpoints carry it,
sharded with the experts, without a format of its own. A checkpoint holds the averaged weights as
the model (what `predict`, the ASE calculator and fine-tuning load) and the raw weights under
"ema": saving swaps the two and swaps back, and a resumed run swaps once after loading.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

KEY = "ema"


class WeightAverage:
    def __init__(self, optimizer: torch.optim.Optimizer, decay: float):
        self.optimizer, self.decay = optimizer, decay

    def _params(self) -> Iterator[tuple[torch.Tensor, dict]]:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state.get(p)
                if state:  # parameters the optimizer has stepped (frozen ones never are)
                    yield p, state

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: average ← average + (1 − d)·(weights − average)."""
        for p, state in self._params():
            n = int(state["step"])
            if KEY not in state:
                state[KEY] = p.detach().clone()
            else:
                state[KEY].lerp_(p.detach(), 1.0 - min(self.decay, (1 + n) / (10 + n)))

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the weights and their average (exact: copies)."""
        for p, state in self._params():
            if KEY in state:
                raw = p.detach().clone()
                p.copy_(state[KEY])
                state[KEY].copy_(raw)

    @contextmanager
    def averaged(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block."""
        self.swap()
        try:
            yield
        finally:
            self.swap()


def weight_average(optimizer: torch.optim.Optimizer, decay: float) -> WeightAverage | None:
    return WeightAverage(optimizer, decay) if decay > 0 else None
