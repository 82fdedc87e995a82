"""Pipeline schedules for a conservative potential's four-phase step, and the simulator that times them.

A step of M micro-batches through S pipeline stages S1…SS. Per micro-batch m and stage s, four phases:

    1  forward            S1 → SS   blocks of s on the received atom/bond state; SS reads out E
    2  force backward     SS → S1   ∂E/∂(state in, geometry) with create_graph; the geometry part is
                                    stage s's share of the forces and virial, summed along the way
    3  loss backward I    S1 → SS   back through stage s's force-backward graph (S1 has the loss)
    4  loss backward II   SS → S1   back through stage s's forward graph

Stages and ranks: with `chunks` = v (parallel.pp_chunks) the blocks are cut into S = pp·v stages and
rank r holds stages r, r + pp, …, r + (v − 1)·pp (interleaved virtual stages, as in Megatron's
interleaved 1F1B): a micro-batch passes every rank v times per phase, each pass 1/v of the rank's work.
With v = 1, stage = rank. Ops are (phase, micro-batch, stage); an order is per rank.

Folded in half at SS, phases 1+2 are one forward pass through a virtual pipeline of 2S stages
(S1…SS SS…S1) and phases 3+4 its backward, with the turnarounds (phase 1→2 on SS, 3→4 on SS, 2→3 on
S1) costing no transfer.

Simulated with the measured phase costs (1, 1.4, 0.5, 3.2), 4 ranks, 6 micro-batches
(`Timeline.chart`; digits: the phase running, '.': idle):

    gpipe: bubble 0.333, 6 micro-batches alive per stage
    S1  1111111........22222222223333.............4444444444444444444444
    S2  .1111111......2222222222..333.........4444444444444444444444....
    S3  ..1111111...2222222222....3333....44444444444444444444444.......
    S4  ...11111112222222222.......33344444444444444444444444...........

The same costs, 4 ranks × 2 stages each, 8 micro-batches, at most 5 micro-batches' graphs per rank:
`folded` in two waves of 4 (1.116× gpipe's throughput, bubble 0.188 against gpipe's 0.273; without
the waves 1.074×):

    S1  111111..22.23323......44441441441444412222323223...4444.4444444444444444
    S2  .11111122.2..223....44.414414414444122122.22233..444434444.44444444444..
    S3  .111112212222.3.3.44.4444244144141221.2.322223.443434444.44444444444....
    S4  ..111221212212..4434444244144442121..2.2222.3443434434344444444444......

Schedules (per rank: the order in which it runs its ops; `simulate` and the executor follow it):
- `gpipe` (the baseline; contiguous stages, v = 1): every micro-batch's phase 1, then every phase 2,
  then 3, then 4. Each stage keeps all M micro-batches' forward and force-backward graphs alive until
  phase 4: memory M graphs per stage.
- `folded` (exaforce's; any v): list scheduling over the folded pipeline. When a rank is free it runs
  its ready op of least priority and admits a new micro-batch (phase 1 on its first stage) only while
  its stage graphs, held or reserved, leave room for the newcomer's within K micro-batches' worth — K
  bounds the double-backward graphs a rank holds (memory: K micro-batches' graphs of its stages,
  about K/pp of one micro-batch's whole-model graph, instead of M). With v > 1 the graphs are counted
  per stage (the executor frees each at its phase 4), so a micro-batch whose phase 4 has passed some
  of a rank's stages holds less than a whole share there. Priorities tried: the oldest micro-batch
  first (ties: the later phase); the oldest weighed against the critical-path work its op leaves;
  and the critical-path work left, less α·micro·Σt for α in ALPHAS (the longest remaining chain
  first, with a pull towards older micro-batches so graphs are released). When K < M, also in
  waves: micro-batches 0 … w − 1 before the next w (w = pp − 1 or pp: about as many as keep every
  rank busy), the longest chain first within a wave, with each phase-1 op taking one stage graph's
  room when it runs instead of reserving the micro-batch's room on entry. Greedy admission lets the
  first K micro-batches in together and the rest wait for all of them: a second, smaller group then
  runs with too few micro-batches to fill the pipeline. Waves of about pp keep the groups even, and
  graphs taken stage by stage let the next wave start while the last one's phase 4 frees the room
  of its later stages. Taken that way the room can run out with every rank's room held by
  micro-batches that wait for room elsewhere: such a candidate stalls and is dropped (the reserving
  candidates never stall). The fastest order in the simulator wins; when K admits every micro-batch
  and v = 1, gpipe's order competes. Every rank computes the same order from the same costs, so
  transfers match without negotiation. K = 0 picks the smallest K whose simulated step is within
  2 % of the fastest.

How much any order can win: the last rank starts after pp − 1 phase-1 ops (its first stage is
pp − 1) and, after its last op, pp − 1 phase-4 ops still run upstream; with v stages per rank each of
those is 1/v of a rank's op, so no order beats `lower_bound` = M·Σt + (pp − 1)·(t₁ + t₄)/v, against
gpipe's (M + pp − 1)·Σt. Where phase 4 (the loss's backward through the forward graph) is half the
work, as measured, contiguous stages (v = 1) leave gpipe within 12 % of any schedule at pp = 8,
M = 16; interleaving lifts that ceiling (1.26× at v = 2, 1.31× at v = 3, 1.34× at v = 4), and
`folded` comes within 2 % of it when K admits every micro-batch. With K = pp + 1 (the graphs of
about one micro-batch per rank: the memory of 1/pp of pp = 1 plus one micro-batch's whole-model
graph) it gets, with the costs measured on 2026-12-06 (1, 1.73, 1.34, 3.96), 1.10× / 1.16× / 1.21×
/ 1.27× / 1.31× at v = 2 / 3 / 4 / 6 / 8 (README: Pipeline parallelism, simulated): two waves of pp
micro-batches each pay the fill and drain of their own, which more stages per rank shorten.

Dependencies (what `simulate` enforces and the executor receives; stages, not ranks):
    (1,m,s) ← (1,m,s−1)          (2,m,s) ← (1,m,s), (2,m,s+1)
    (3,m,s) ← (2,m,s), (3,m,s−1)  (4,m,s) ← (3,m,s), (4,m,s+1)
"""

from __future__ import annotations

import functools
import heapq
import itertools
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from exaforce.config import PP_SCHEDULES as SCHEDULES

# Relative cost of the four phases (phase 1 = 1), from `exaforce bench pp --preset small` (light block,
# dense cells; the demo preset measured 1, 1.45, 0.92, 3.54, README); only the order of the folded
# schedule depends on them, never its result.
DEFAULT_PHASE_COSTS = (1.0, 1.4, 0.5, 3.2)
Costs = tuple[float, float, float, float]  # the four phases' relative costs of a rank's whole share of blocks
ALPHAS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)  # pulls towards older micro-batches the folded schedule tries
WAVE_ALPHAS = (0.2, 0.4, 0.6)                 # … and within waves of micro-batches (module docstring)


class Op(NamedTuple):
    """One phase of one micro-batch on one stage (with pp_chunks > 1 a rank holds several stages). A
    named tuple: hashed and compared in C, which the list scheduler does millions of times at pp = 64."""

    phase: int  # 1 … 4
    micro: int
    stage: int = 0


@dataclass(frozen=True)
class Pipeline:
    """pp ranks, `chunks` stages each: stage s runs on rank s % pp."""

    pp: int
    chunks: int = 1

    @property
    def stages(self) -> int:
        return self.pp * self.chunks

    def rank(self, stage: int) -> int:
        return stage % self.pp

    def stages_of(self, rank: int) -> list[int]:
        return list(range(rank, self.stages, self.pp))

    def cost(self, op: Op, costs: Costs) -> float:
        return costs[op.phase - 1] / self.chunks


def dependencies(op: Op, stages: int) -> list[Op]:
    """The ops that must finish before `op` runs (a pipeline of `stages` stages)."""
    m, phase, s = op.micro, op.phase, op.stage
    if phase == 1:
        return [Op(1, m, s - 1)] if s > 0 else []
    own = [Op(phase - 1, m, s)]
    if phase in (2, 4):  # upward: from the next stage
        return own + [Op(phase, m, s + 1)] if s < stages - 1 else own
    return own + [Op(3, m, s - 1)] if s > 0 else own


def gpipe(pp: int, micro_batches: int) -> list[list[Op]]:
    """All phase-1 ops, then all phase 2, 3, 4 (micro-batches in order), on every stage (v = 1)."""
    return [[Op(phase, m, s) for phase in (1, 2, 3, 4) for m in range(micro_batches)] for s in range(pp)]


@dataclass
class Timeline:
    """A simulated (or measured) step: when each op ran."""

    pipeline: Pipeline
    start: dict[Op, float] = field(default_factory=dict)
    end: dict[Op, float] = field(default_factory=dict)

    @property
    def makespan(self) -> float:
        return max(self.end.values(), default=0.0)

    def busy(self, rank: int) -> float:
        return sum(t - self.start[op] for op, t in self.end.items() if self.pipeline.rank(op.stage) == rank)

    @property
    def bubble(self) -> float:
        """Idle share of the ranks' time: 1 − Σ busy / (pp · makespan)."""
        span, pp = self.makespan, self.pipeline.pp
        return 0.0 if span == 0 else 1.0 - sum(self.busy(r) for r in range(pp)) / (pp * span)

    def chart(self, columns: int = 72) -> str:
        """One text row per rank, time to the right: the phase digit of the op running, '.' idle."""
        scale = columns / self.makespan
        rows = [["."] * columns for _ in range(self.pipeline.pp)]
        for op, start in self.start.items():
            for c in range(int(start * scale + 0.5), int(self.end[op] * scale + 0.5)):
                rows[self.pipeline.rank(op.stage)][min(c, columns - 1)] = str(op.phase)
        return "\n".join(f"S{r + 1:<3}{''.join(row)}" for r, row in enumerate(rows))

    def peak_alive(self, rank: int) -> float:
        """The most graphs the rank held at once, in micro-batches' worth (a stage's graph lives from its
        phase 1 to its phase 4 and is 1/chunks of the rank's share of a micro-batch's graph)."""
        ops = [op for op in self.start if self.pipeline.rank(op.stage) == rank]
        events = sorted([(self.start[op], 1) for op in ops if op.phase == 1]
                        + [(self.end[op], -1) for op in ops if op.phase == 4])
        alive = peak = 0
        for _, change in events:  # at equal times a release (−1) sorts before an admission
            alive += change
            peak = max(peak, alive)
        return peak / self.pipeline.chunks


def simulate(orders: list[list[Op]], costs: Costs, chunks: int = 1) -> Timeline:
    """Times each rank's ops in its order: an op starts when the rank is free and its dependencies are
    done (equal stages: costs[phase − 1] / chunks per op). Raises on a deadlocked order."""
    pipeline = Pipeline(len(orders), chunks)
    timeline = Timeline(pipeline)
    position = [0] * pipeline.pp
    free = [0.0] * pipeline.pp
    progress = True
    while progress:
        progress = False
        for r, order in enumerate(orders):
            while position[r] < len(order):
                op = order[position[r]]
                deps = dependencies(op, pipeline.stages)
                if any(d not in timeline.end for d in deps):
                    break
                ready = max([free[r]] + [timeline.end[d] for d in deps])
                timeline.start[op] = ready
                free[r] = timeline.end[op] = ready + pipeline.cost(op, costs)
                position[r] += 1
                progress = True
    if any(position[r] < len(orders[r]) for r in range(pipeline.pp)):
        stuck = {r: orders[r][position[r]] for r in range(pipeline.pp) if position[r] < len(orders[r])}
        raise ValueError(f"pipeline schedule deadlocks: ranks wait on {stuck}")
    return timeline


def _critical_path(pipeline: Pipeline, costs: Costs) -> dict[tuple[int, int], float]:
    """Per (phase, stage): the work left in a micro-batch from the start of that op to its end, alone
    in the pipeline (the op's own cost included)."""
    stages = range(pipeline.stages)
    chain = [(1, s) for s in stages] + [(2, s) for s in reversed(stages)] + \
            [(3, s) for s in stages] + [(4, s) for s in reversed(stages)]
    left, total = {}, 0.0
    for phase, s in reversed(chain):
        total += costs[phase - 1] / pipeline.chunks
        left[(phase, s)] = total
    return left


def _list_schedule(pipeline: Pipeline, micro_batches: int, alive: int, costs: Costs,
                   priority: Callable[[Op], tuple], reserve: bool = True) -> list[list[Op]] | None:
    """Each rank, whenever free, runs its ready op of least `priority`. Memory is counted in stage graphs
    (a stage's lives from its phase 1 to its phase 4), at most `alive`·chunks per rank. With `reserve`, a
    micro-batch enters the rank's first stage only while the rank's stage graphs, held or reserved,
    leave room for its `chunks` ones; it reserves them there and each of its phase-4 ops frees one:
    reserved on entry, a micro-batch always finds its graphs' room further on, so the bound cannot
    deadlock the pipeline. Without, each phase-1 op takes a graph's room when it runs (a micro-batch
    may enter before the room for all its stages on the rank is free): the room is used sooner, but
    the pipeline can stall with every rank's room held by micro-batches that wait for room elsewhere;
    then None. Returns the orders it produced."""
    pp, v = pipeline.pp, pipeline.chunks
    orders: list[list[Op]] = [[] for _ in range(pp)]
    done: dict[Op, float] = {}
    held, free = [0] * pp, [0.0] * pp  # stage graphs held (or reserved) per rank
    pending = {r: {Op(1, 0, s) for s in pipeline.stages_of(r)} for r in range(pp)}  # candidate ops per rank
    events: list[tuple[float, int]] = [(0.0, r) for r in range(pp)]
    total = 4 * micro_batches * v

    def room(op: Op, r: int) -> bool:
        if op.phase != 1:
            return True
        if reserve:
            return op.stage != r or held[r] + v <= alive * v
        return held[r] + 1 <= alive * v

    inputs_done: dict[Op, float] = {}  # per op whose dependencies have all finished: when the last did

    def ready(op: Op, now: float) -> bool:
        if op not in inputs_done:
            deps = dependencies(op, pipeline.stages)
            if any(d not in done for d in deps):
                return False
            inputs_done[op] = max((done[d] for d in deps), default=0.0)
        return inputs_done[op] <= now

    while events:
        now, r = heapq.heappop(events)
        if now < free[r] or len(orders[r]) == total:
            continue
        ready_ops = [op for op in pending[r] if ready(op, now) and room(op, r)]
        if not ready_ops:
            continue
        op = min(ready_ops, key=priority)
        pending[r].discard(op)
        orders[r].append(op)
        end = now + pipeline.cost(op, costs)
        done[op] = free[r] = end
        if op.phase == 1:
            held[r] += (v if op.stage == r else 0) if reserve else 1
            if op.micro + 1 < micro_batches:
                pending[r].add(Op(1, op.micro + 1, op.stage))
        if op.phase == 4:
            held[r] -= 1
        if op.phase < 4:
            pending[r].add(Op(op.phase + 1, op.micro, op.stage))
        # This rank looks again when it is free; the rank this op may have unblocked, when it ends.
        heapq.heappush(events, (end, r))
        neighbour = op.stage + 1 if op.phase in (1, 3) else op.stage - 1
        if 0 <= neighbour < pipeline.stages:
            other = pipeline.rank(neighbour)
            heapq.heappush(events, (max(end, free[other]), other))
    if all(len(o) == total for o in orders):
        return orders
    if reserve:
        raise AssertionError("folded schedule: list scheduling left ops unscheduled")
    return None  # stalled: every rank's room held by micro-batches waiting for room elsewhere


@functools.lru_cache(maxsize=64)
def folded(pp: int, micro_batches: int, alive: int, costs: Costs = DEFAULT_PHASE_COSTS,
           chunks: int = 1) -> list[list[Op]]:
    """exaforce's schedule (module docstring): at most `alive` micro-batches per rank, the fastest in the
    simulator of the list-scheduling priorities there and, when the bound admits every micro-batch on
    contiguous stages, gpipe's order. Cached (choose_alive, the trainer and the bench ask for the same
    ones; do not modify the lists)."""
    if alive < 1:
        raise ValueError(f"folded schedule: alive = {alive}, need >= 1")
    pipeline = Pipeline(pp, chunks)
    left = _critical_path(pipeline, costs)
    per_micro = sum(costs)
    priorities: list[Callable[[Op], tuple]] = [
        lambda o: (o.micro, -o.phase),
        lambda o: (o.micro - left[(o.phase, o.stage)] / per_micro, -o.phase)]
    priorities += [functools.partial(_longest_chain_first, left, alpha * per_micro / chunks) for alpha in ALPHAS]
    candidates = [_list_schedule(pipeline, micro_batches, alive, costs, p) for p in priorities]
    if alive < micro_batches:  # waves of about pp micro-batches, graphs taken stage by stage
        for size, alpha in itertools.product(sorted({max(pp - 1, 1), pp}), WAVE_ALPHAS):
            in_waves = functools.partial(_in_waves, size, max(micro_batches // size, 1),
                                         functools.partial(_longest_chain_first, left, alpha * per_micro / chunks))
            orders = _list_schedule(pipeline, micro_batches, alive, costs, in_waves, reserve=False)
            if orders is not None:
                candidates.append(orders)
    if alive >= micro_batches and chunks == 1:
        candidates.append(gpipe(pp, micro_batches))
    return min(candidates, key=lambda orders: simulate(orders, costs, chunks).makespan)


def _longest_chain_first(left: dict[tuple[int, int], float], pull: float, op: Op) -> tuple:
    return (pull * op.micro - left[(op.phase, op.stage)], -op.phase)


def _in_waves(size: int, waves: int, priority: Callable[[Op], tuple], op: Op) -> tuple:
    """Micro-batches 0 … size − 1 before the next `size`, and so on, the last of the `waves` taking the
    rest; `priority` within a wave."""
    return (min(op.micro // size, waves - 1), *priority(op))


def lower_bound(pp: int, micro_batches: int, costs: Costs, chunks: int = 1) -> float:
    """No order of these ops finishes sooner (equal stages): the last rank (first stage pp − 1) starts
    after pp − 1 phase-1 ops of 1/chunks of a rank's work each, does M·Σt of work and, after its last
    op (phase 4 on that stage), pp − 1 such phase-4 ops still run upstream."""
    return micro_batches * sum(costs) + (pp - 1) * (costs[0] + costs[3]) / chunks


@functools.lru_cache(maxsize=64)
def choose_alive(pp: int, micro_batches: int, costs: Costs = DEFAULT_PHASE_COSTS, chunks: int = 1,
                 tolerance: float = 0.02) -> int:
    """The smallest bound on live micro-batches whose folded step is within `tolerance` of the fastest,
    among pp, pp + 1, 3·pp/2, 2·pp and all (a round trip through the pipeline takes about pp ops'
    time on every rank, so fewer than pp alive always starves it). Cached: the trainer asks every step."""
    candidates = sorted({min(k, micro_batches) for k in (pp, pp + 1, (3 * pp) // 2, 2 * pp, micro_batches)})
    spans = {k: simulate(folded(pp, micro_batches, k, costs, chunks), costs, chunks).makespan for k in candidates}
    best = min(spans.values())
    return min(k for k, span in spans.items() if span <= best * (1 + tolerance))


def schedule(name: str, pp: int, micro_batches: int, alive: int = 0, costs: Costs = DEFAULT_PHASE_COSTS,
             chunks: int = 1) -> list[list[Op]]:
    """Every rank's op order for `name` (SCHEDULES); alive = 0: chosen by `choose_alive`."""
    if name == "gpipe":
        if chunks != 1:
            raise ValueError(f"gpipe runs contiguous stages: pp_chunks = {chunks} needs pp_schedule = 'folded'")
        return gpipe(pp, micro_batches)
    if name == "folded":
        return folded(pp, micro_batches, alive or choose_alive(pp, micro_batches, costs, chunks), costs, chunks)
    raise ValueError(f"parallel.pp_schedule = {name!r}: must be one of {', '.join(SCHEDULES)}")
