"""Pipeline schedules for a conservative potential's four-phase step, and the simulator that times them.

A step of P stages S1…SP and M micro-batches. Per micro-batch m and stage s, four phases:

    1  forward            S1 → SP   blocks of s on the received atom/bond state; SP reads out E
    2  force backward     SP → S1   ∂E/∂(state in, geometry) with create_graph; the geometry part is
                                    stage s's share of the forces and virial, summed along the way
    3  loss backward I    S1 → SP   back through stage s's force-backward graph (S1 has the loss)
    4  loss backward II   SP → S1   back through stage s's forward graph

Folded in half at SP, phases 1+2 are one forward pass through a virtual pipeline of 2P stages
(S1…SP SP…S1) and phases 3+4 its backward (S1…SP SP…S1 reversed), with each rank holding two
virtual stages (s and 2P+1−s, the "V" placement): the loss sits on S1 at the end of the virtual
forward, and the turnarounds (phase 1→2 on SP, 3→4 on SP, 2→3 on S1) cost no transfer.

    stage   time →
    S1      1 1 1 1 . . . . . 2 . 2 3 2 3 2 3 3 . . . . . . . . 4 . 4 4 4        gpipe  (all 1, all 2, …)
    SP      . . . 1 1 1 1 2 2 2 2 . . . . . . 3 4 3 4 3 4 3 4 . . . .
    S1      1 1 1 1 . . 2 . 2 3 2 3 4 2 3 4 3 4 1 …                           folded (oldest first,
    SP      . . . 1 2 1 2 1 2 3 4 3 4 …                                        ≤ K micro-batches alive)

Schedules (per stage: the order in which it runs its ops; `simulate` and the executor follow it):
- `gpipe`: every micro-batch's phase 1, then every phase 2, then 3, then 4. Each stage keeps all M
  micro-batches' forward and force-backward graphs alive until phase 4: memory M graphs per stage.
- `folded` (exaforce's): list scheduling over the folded pipeline. When a stage is free it runs the
  ready op of the oldest micro-batch (ties: the later phase), and admits a new micro-batch (its
  phase 1) only while fewer than K are alive on it — K bounds the double-backward graphs a stage
  holds (memory K graphs instead of M). The order comes from simulating that policy with the
  phases' relative costs; every rank computes the same order from the same costs, so transfers
  match without negotiation. K = 0 picks the smallest K whose simulated step is within 2 % of
  the fastest.

Dependencies (what `simulate` enforces and the executor receives):
    (1,m,s) ← (1,m,s−1)          (2,m,s) ← (1,m,s), (2,m,s+1)
    (3,m,s) ← (2,m,s), (3,m,s−1)  (4,m,s) ← (3,m,s), (4,m,s+1)
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Sequence

from exaforce.config import PP_SCHEDULES as SCHEDULES
# Relative cost of the four phases, measured by `exaforce bench pp` on the light block (dense cells);
# only the order of the folded schedule depends on them, never its result.
DEFAULT_PHASE_COSTS = (1.0, 1.6, 3.2, 2.0)


@dataclass(frozen=True, order=True, slots=True)
class Op:
    """One phase of one micro-batch on one stage."""

    phase: int  # 1 … 4
    micro: int


def dependencies(op: Op, stage: int, pp: int) -> list[tuple[Op, int]]:
    """The (op, stage) pairs that must finish before `op` runs on `stage`."""
    m = op.micro
    previous = {1: [(Op(1, m), stage - 1)] if stage > 0 else [],
                2: [(Op(1, m), stage)] + ([(Op(2, m), stage + 1)] if stage < pp - 1 else []),
                3: [(Op(2, m), stage)] + ([(Op(3, m), stage - 1)] if stage > 0 else []),
                4: [(Op(3, m), stage)] + ([(Op(4, m), stage + 1)] if stage < pp - 1 else [])}
    return previous[op.phase]


def gpipe(pp: int, micro_batches: int) -> list[list[Op]]:
    """All phase-1 ops, then all phase 2, 3, 4 (micro-batches in order), on every stage."""
    order = [Op(phase, m) for phase in (1, 2, 3, 4) for m in range(micro_batches)]
    return [list(order) for _ in range(pp)]


@dataclass
class Timeline:
    """A simulated (or measured) step: when each op ran on each stage."""

    pp: int
    start: dict[tuple[Op, int], float] = field(default_factory=dict)
    end: dict[tuple[Op, int], float] = field(default_factory=dict)

    @property
    def makespan(self) -> float:
        return max(self.end.values(), default=0.0)

    def busy(self, stage: int) -> float:
        return sum(t - self.start[key] for key, t in self.end.items() if key[1] == stage)

    @property
    def bubble(self) -> float:
        """Idle share of the stages' time: 1 − Σ busy / (pp · makespan)."""
        span = self.makespan
        return 0.0 if span == 0 else 1.0 - sum(self.busy(s) for s in range(self.pp)) / (self.pp * span)

    def peak_alive(self, stage: int) -> int:
        """The most micro-batches whose graphs the stage held at once (phase 1 started, phase 4 not done)."""
        events = sorted([(self.start[(op, s)], 1) for op, s in self.start if s == stage and op.phase == 1]
                        + [(self.end[(op, s)], -1) for op, s in self.end if s == stage and op.phase == 4])
        alive = peak = 0
        for _, change in events:  # at equal times a release (−1) sorts before an admission
            alive += change
            peak = max(peak, alive)
        return peak


def _cost(costs: Sequence[Sequence[float]] | Sequence[float], op: Op, stage: int) -> float:
    """costs[phase-1] (the same on every stage) or costs[stage][phase-1]."""
    row = costs[stage] if isinstance(costs[0], (list, tuple)) else costs
    return float(row[op.phase - 1])


def simulate(orders: list[list[Op]], costs: Sequence[Sequence[float]] | Sequence[float],
             transfer: float = 0.0) -> Timeline:
    """Times each stage's ops in its order: an op starts when the stage is free and its dependencies
    are done (+ `transfer` for one that comes from another stage). Raises on a deadlocked order."""
    pp = len(orders)
    timeline = Timeline(pp)
    position = [0] * pp
    free = [0.0] * pp
    progress = True
    while progress:
        progress = False
        for s in range(pp):
            while position[s] < len(orders[s]):
                op = orders[s][position[s]]
                deps = dependencies(op, s, pp)
                if any(d not in timeline.end for d in deps):
                    break
                ready = max([free[s]] + [timeline.end[d] + (transfer if d[1] != s else 0.0) for d in deps])
                timeline.start[(op, s)] = ready
                free[s] = timeline.end[(op, s)] = ready + _cost(costs, op, s)
                position[s] += 1
                progress = True
    if any(position[s] < len(orders[s]) for s in range(pp)):
        stuck = {s: orders[s][position[s]] for s in range(pp) if position[s] < len(orders[s])}
        raise ValueError(f"pipeline schedule deadlocks: stages wait on {stuck}")
    return timeline


def folded(pp: int, micro_batches: int, alive: int, costs: Sequence[Sequence[float]] | Sequence[float]
           = DEFAULT_PHASE_COSTS) -> list[list[Op]]:
    """exaforce's schedule (module docstring): oldest micro-batch first, at most `alive` per stage."""
    if alive < 1:
        raise ValueError(f"folded schedule: alive = {alive}, need >= 1")
    orders: list[list[Op]] = [[] for _ in range(pp)]
    done: dict[tuple[Op, int], float] = {}
    admitted = [0] * pp        # micro-batches whose phase 1 ran on the stage
    finished = [0] * pp        # … and whose phase 4 ran
    free = [0.0] * pp
    pending = {s: {Op(1, 0)} for s in range(pp)}  # candidate ops per stage
    events: list[tuple[float, int]] = [(0.0, s) for s in range(pp)]
    total = 4 * micro_batches
    while events:
        now, s = heapq.heappop(events)
        if now < free[s] or len(orders[s]) == total:
            continue
        ready = [op for op in pending[s]
                 if all(d in done and done[d] <= now for d in dependencies(op, s, pp))
                 and (op.phase != 1 or admitted[s] - finished[s] < alive)]
        if not ready:
            continue
        op = min(ready, key=lambda o: (o.micro, -o.phase))
        pending[s].discard(op)
        orders[s].append(op)
        end = now + _cost(costs, op, s)
        done[(op, s)] = free[s] = end
        if op.phase == 1:
            admitted[s] += 1
            if op.micro + 1 < micro_batches:
                pending[s].add(Op(1, op.micro + 1))
        if op.phase == 4:
            finished[s] += 1
        if op.phase < 4:
            pending[s].add(Op(op.phase + 1, op.micro))
        # This stage looks again when it is free; its neighbours when this op may have unblocked them.
        for t in {s, max(s - 1, 0), min(s + 1, pp - 1)}:
            heapq.heappush(events, (max(end, free[t]), t))
    if any(len(o) != total for o in orders):
        raise AssertionError("folded schedule: list scheduling left ops unscheduled")
    return orders


def choose_alive(pp: int, micro_batches: int, costs: Sequence[Sequence[float]] | Sequence[float]
                 = DEFAULT_PHASE_COSTS, tolerance: float = 0.02) -> int:
    """The smallest bound on live micro-batches whose folded step is within `tolerance` of the fastest."""
    spans = {k: simulate(folded(pp, micro_batches, k, costs), costs).makespan for k in range(1, micro_batches + 1)}
    best = min(spans.values())
    return min(k for k, span in spans.items() if span <= best * (1 + tolerance))


def schedule(name: str, pp: int, micro_batches: int, alive: int = 0,
             costs: Sequence[Sequence[float]] | Sequence[float] = DEFAULT_PHASE_COSTS) -> list[list[Op]]:
    """Every stage's op order for `name` (SCHEDULES); alive = 0: chosen by `choose_alive`."""
    if name == "gpipe":
        return gpipe(pp, micro_batches)
    if name == "folded":
        return folded(pp, micro_batches, alive or choose_alive(pp, micro_batches, costs), costs)
    raise ValueError(f"parallel.pp_schedule = {name!r}: must be one of {', '.join(SCHEDULES)}")
