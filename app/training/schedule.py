"""The optimizer and its learning-rate schedule: linear warm-up, then cosine decay to optim.lr_final
of the peak over the run's steps, or over its time budget (run.max_seconds) when that comes first."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from exaforce.config import Config, OptimConfig
from exaforce.model.potential import Potential


@dataclass(frozen=True)
class Schedule:
    """Learning rate at optimizer step `step` (1-based) of a run of `total_steps`."""

    optim: OptimConfig
    total_steps: int

    def lr_at(self, step: int, time_fraction: float = 0.0) -> float:
        """time_fraction: the share of the time budget spent (the same on every rank)."""
        warmup, peak, final = self.optim.warmup_steps, self.optim.lr, self.optim.lr_final
        if step <= warmup:
            return peak * step / max(warmup, 1)
        progress = max((step - warmup) / max(self.total_steps - warmup, 1), time_fraction)
        return peak * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model: Potential, cfg: Config) -> tuple[torch.optim.Optimizer, Schedule]:
    """AdamW over every parameter (frozen ones never get a gradient) and the run's schedule."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                  amsgrad=cfg.optim.amsgrad)
    return optimizer, Schedule(cfg.optim, cfg.run.steps)
