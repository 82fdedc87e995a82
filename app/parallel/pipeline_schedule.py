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

Simulated with the measured phase costs (1, 1.4, 0.5, 3.2), 4 stages, 6 micro-batches
(`Timeline.chart`; digits: the phase running, '.': idle):

    gpipe: bubble 0.333, 6 micro-batches alive per stage
    S1  1111111........22222222223333.............4444444444444444444444
    S2  .1111111......2222222222..333.........4444444444444444444444....
    S3  ..1111111...2222222222....3333....44444444444444444444444.......
    S4  ...11111112222222222.......33344444444444444444444444...........

    folded, at most 4 alive: bubble 0.372 (6 % longer), 4 alive
    S1  11111.....2222322.22.......4441444444441444423...22.........44444444
    S2  .11111...2.23.23223.3..444444444444144441.22..322..3....4444.444....
    S3  ..111112222.22.23..44444444.444.44441...221...23....4444.4444.......
    S4  ...11212212212244443444344444444.....112...122..344434444...........

Schedules (per stage: the order in which it runs its ops; `simulate` and the executor follow it):
- `gpipe`: every micro-batch's phase 1, then every phase 2, then 3, then 4. Each stage keeps all M
  micro-batches' forward and force-backward graphs alive until phase 4: memory M graphs per stage.
- `folded` (exaforce's): list scheduling over the folded pipeline. When a stage is free it runs the
  ready op of the oldest micro-batch (ties: the later phase; or, if the simulator finds it faster,
  the oldest weighed against the critical-path work its op leaves), and admits a new micro-batch
  (its phase 1) only while fewer than K are alive on it — K bounds the double-backward graphs a
  stage holds (memory: K graphs of one stage, about K/pp of one micro-batch's whole-model graph,
  instead of M). The order comes from simulating that policy with the phases' relative costs; every
  rank computes the same order from the same costs, so transfers match without negotiation. K = 0
  picks the smallest K whose simulated step is within 2 % of the fastest (gpipe's order included
  when K admits every micro-batch).

How much any order can win: the last stage starts after pp − 1 phase-1 ops, and after its last op
pp − 1 phase-4 ops still run upstream, so no schedule of contiguous stages beats `lower_bound` =
M·Σt + (pp − 1)·(t₁ + t₄), against gpipe's (M + pp − 1)·Σt. Where phase 4 (the loss's backward
through the forward graph) is half the work, as measured, that leaves gpipe within 11 % of any
schedule at pp = 8, M = 16; bounding the graphs alive (K ≈ pp) costs 10–25 % in the simulator.

Dependencies (what `simulate` enforces and the executor receives):
    (1,m,s) ← (1,m,s−1)          (2,m,s) ← (1,m,s), (2,m,s+1)
    (3,m,s) ← (2,m,s), (3,m,s−1)  (4,m,s) ← (3,m,s), (4,m,s+1)
"""

from __future__ import annotations

import functools
import heapq
from dataclasses import dataclass, field
from typing import Callable

from exaforce.config import PP_SCHEDULES as SCHEDULES

# Relative cost of the four phases (phase 1 = 1), from `exaforce bench pp --preset small` (light block,
# dense cells; the demo preset measured 1, 1.45, 0.92, 3.54, README); only the order of the folded
# schedule depends on them, never its result.
DEFAULT_PHASE_COSTS = (1.0, 1.4, 0.5, 3.2)
Costs = tuple[float, float, float, float]  # the four phases' relative costs, the same on every stage


@dataclass(frozen=True, order=True, slots=True)
class Op:
    """One phase of one micro-batch on one stage."""

    phase: int  # 1 … 4
    micro: int


def dependencies(op: Op, stage: int, pp: int) -> list[tuple[Op, int]]:
    """The (op, stage) pairs that must finish before `op` runs on `stage`."""
    m, phase = op.micro, op.phase
    if phase == 1:
        return [(Op(1, m), stage - 1)] if stage > 0 else []
    own = [(Op(phase - 1, m), stage)]
    if phase in (2, 4):  # upward: from the next stage
        return own + [(Op(phase, m), stage + 1)] if stage < pp - 1 else own
    return own + [(Op(3, m), stage - 1)] if stage > 0 else own


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

    def chart(self, columns: int = 72) -> str:
        """One text row per stage, time to the right: the phase digit of the op running, '.' idle."""
        scale = columns / self.makespan
        rows = [["."] * columns for _ in range(self.pp)]
        for (op, s), start in self.start.items():
            for c in range(int(start * scale + 0.5), int(self.end[(op, s)] * scale + 0.5)):
                rows[s][min(c, columns - 1)] = str(op.phase)
        return "\n".join(f"S{s + 1:<3}{''.join(row)}" for s, row in enumerate(rows))

    def peak_alive(self, stage: int) -> int:
        """The most micro-batches whose graphs the stage held at once (phase 1 started, phase 4 not done)."""
        events = sorted([(self.start[(op, s)], 1) for op, s in self.start if s == stage and op.phase == 1]
                        + [(self.end[(op, s)], -1) for op, s in self.end if s == stage and op.phase == 4])
        alive = peak = 0
        for _, change in events:  # at equal times a release (−1) sorts before an admission
            alive += change
            peak = max(peak, alive)
        return peak


def simulate(orders: list[list[Op]], costs: Costs) -> Timeline:
    """Times each stage's ops in its order: an op starts when the stage is free and its dependencies
    are done (equal stages: costs[phase − 1] per op). Raises on a deadlocked order."""
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
                ready = max([free[s]] + [timeline.end[d] for d in deps])
                timeline.start[(op, s)] = ready
                free[s] = timeline.end[(op, s)] = ready + costs[op.phase - 1]
                position[s] += 1
                progress = True
    if any(position[s] < len(orders[s]) for s in range(pp)):
        stuck = {s: orders[s][position[s]] for s in range(pp) if position[s] < len(orders[s])}
        raise ValueError(f"pipeline schedule deadlocks: stages wait on {stuck}")
    return timeline


def _critical_path(pp: int, costs: Costs) -> dict[tuple[int, int], float]:
    """Per (phase, stage): the work left in a micro-batch from the start of that op to its end, alone
    in the pipeline (the op's own cost included)."""
    chain = [(1, s) for s in range(pp)] + [(2, s) for s in reversed(range(pp))] + \
            [(3, s) for s in range(pp)] + [(4, s) for s in reversed(range(pp))]
    left, total = {}, 0.0
    for phase, s in reversed(chain):
        total += costs[phase - 1]
        left[(phase, s)] = total
    return left


def _list_schedule(pp: int, micro_batches: int, alive: int, costs: Costs,
                   priority: Callable[[Op, int], tuple]) -> list[list[Op]]:
    """Each stage, whenever free, runs its ready op of least `priority`; a micro-batch's phase 1 only
    while fewer than `alive` are alive on the stage. Returns the orders it produced."""
    orders: list[list[Op]] = [[] for _ in range(pp)]
    done: dict[tuple[Op, int], float] = {}
    admitted, finished, free = [0] * pp, [0] * pp, [0.0] * pp
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
        op = min(ready, key=lambda o: priority(o, s))
        pending[s].discard(op)
        orders[s].append(op)
        end = now + costs[op.phase - 1]
        done[(op, s)] = free[s] = end
        if op.phase == 1:
            admitted[s] += 1
            if op.micro + 1 < micro_batches:
                pending[s].add(Op(1, op.micro + 1))
        if op.phase == 4:
            finished[s] += 1
        if op.phase < 4:
            pending[s].add(Op(op.phase + 1, op.micro))
        # This stage looks again when it is free; the neighbour this op may have unblocked, when it ends.
        heapq.heappush(events, (end, s))
        neighbour = s + 1 if op.phase in (1, 3) else s - 1
        if 0 <= neighbour < pp:
            heapq.heappush(events, (max(end, free[neighbour]), neighbour))
    if any(len(o) != total for o in orders):
        raise AssertionError("folded schedule: list scheduling left ops unscheduled")
    return orders


@functools.lru_cache(maxsize=64)
def folded(pp: int, micro_batches: int, alive: int, costs: Costs = DEFAULT_PHASE_COSTS) -> list[list[Op]]:
    """exaforce's schedule (module docstring): at most `alive` micro-batches per stage, the fastest in
    the simulator of two list-scheduling priorities — the oldest micro-batch first (ties: the later
    phase), and the oldest once weighed against the work its op leaves on the critical path — and,
    when the bound admits every micro-batch, gpipe's order. Cached (choose_alive, the trainer and the
    bench ask for the same ones; do not modify the lists)."""
    if alive < 1:
        raise ValueError(f"folded schedule: alive = {alive}, need >= 1")
    left = _critical_path(pp, costs)
    per_micro = sum(costs)
    candidates = [_list_schedule(pp, micro_batches, alive, costs, lambda o, s: (o.micro, -o.phase)),
                  _list_schedule(pp, micro_batches, alive, costs,
                                 lambda o, s: (o.micro - left[(o.phase, s)] / per_micro, -o.phase))]
    if alive >= micro_batches:
        candidates.append(gpipe(pp, micro_batches))
    return min(candidates, key=lambda orders: simulate(orders, costs).makespan)


def lower_bound(pp: int, micro_batches: int, costs: Costs) -> float:
    """No order of these ops on contiguous stages finishes sooner (equal stages): the last stage
    starts after pp − 1 phase-1 ops and, after its last op, pp − 1 phase-4 ops still run upstream."""
    return micro_batches * sum(costs) + (pp - 1) * (costs[0] + costs[3])


def choose_alive(pp: int, micro_batches: int, costs: Costs
                 = DEFAULT_PHASE_COSTS, tolerance: float = 0.02) -> int:
    """The smallest bound on live micro-batches whose folded step is within `tolerance` of the fastest,
    among pp, pp + 1, 3·pp/2, 2·pp and all (a round trip through the pipeline takes about pp ops'
    time on every stage, so fewer than pp alive always starves it)."""
    candidates = sorted({min(k, micro_batches) for k in (pp, pp + 1, (3 * pp) // 2, 2 * pp, micro_batches)})
    spans = {k: simulate(folded(pp, micro_batches, k, costs), costs).makespan for k in candidates}
    best = min(spans.values())
    return min(k for k, span in spans.items() if span <= best * (1 + tolerance))


def schedule(name: str, pp: int, micro_batches: int, alive: int = 0,
             costs: Costs = DEFAULT_PHASE_COSTS) -> list[list[Op]]:
    """Every stage's op order for `name` (SCHEDULES); alive = 0: chosen by `choose_alive`."""
    if name == "gpipe":
        return gpipe(pp, micro_batches)
    if name == "folded":
        return folded(pp, micro_batches, alive or choose_alive(pp, micro_batches, costs), costs)
    raise ValueError(f"parallel.pp_schedule = {name!r}: must be one of {', '.join(SCHEDULES)}")
