"""Where each expert of an MoE layer should live: a placement that balances the EP ranks' expert work.

Element routing makes a step's work per expert known before its forward (token counts per
routing class × the routers' top-k tables: exaforce.model.routing), and the perf log records it
every step (`expert_load`). From such loads, `balanced_placement` assigns experts to EP ranks by
LPT (longest processing time first: the heaviest expert goes to the least-loaded rank that still
has room), the classic greedy for balancing a maximum. Every rank holds the same number of experts
(X/ep, as in the default placement, plus any spare slots); among equally loaded ranks an expert
stays where it is, so fewer experts move. With spare slots the busiest experts get replicas, which
share their rows (exaforce.model.routing.split_pairs): a replica's memory buys balance that whole
experts cannot give when one expert carries more than 1/ep of the load.

A placement changes no number: the routing plan sends each (token, slot) pair to a rank holding its
expert, whichever that is (tests/mpi/test_ep_equivalence.py, `scattered`; replicas:
tests/mpi/test_expert_placement.py).
"""

from __future__ import annotations

import numpy as np

from exaforce.model.routing import Placement


def rank_work(load_X: np.ndarray, placement: Placement, ep_size: int) -> np.ndarray:
    """Work per EP rank: its experts' loads, a replicated expert's shared evenly by its holders."""
    work = np.zeros(ep_size)
    for load, holders in zip(np.asarray(load_X, dtype=np.float64), placement):
        work[list(holders)] += load / len(holders)
    return work


def max_over_mean(load_X: np.ndarray, placement: Placement, ep_size: int) -> float:
    """Max / mean over EP ranks of their work: 1 is perfect balance."""
    work = rank_work(load_X, placement, ep_size)
    return float(work.max() / work.mean()) if work.mean() > 0 else 1.0


def balanced_placement(load_X: np.ndarray, ep_size: int, current: Placement | None = None,
                       spare_slots: int = 0) -> Placement:
    """Each expert's holders: LPT over `load_X` (work per expert, e.g. rows over recent steps) into
    X/ep + `spare_slots` experts per rank. The spare slots hold replicas: ep·spare_slots times the
    expert with the largest load per copy gains a copy (at most one per rank); a copy's work is its
    expert's load over its copies. Copies of replicated experts are placed first, each on a
    different rank; ties between ranks go to a rank that already holds the expert in `current`,
    then to the lower rank."""
    load_X = np.asarray(load_X, dtype=np.float64)
    n_experts = len(load_X)
    if n_experts % ep_size:
        raise ValueError(f"{n_experts} experts do not split evenly over {ep_size} EP ranks")
    if not 0 <= spare_slots <= n_experts // ep_size:
        raise ValueError(f"{spare_slots} spare expert slots per rank: must be between 0 and {n_experts // ep_size}")
    copies = np.ones(n_experts, dtype=np.int64)
    for _ in range(ep_size * spare_slots):
        per_copy = np.where(copies < ep_size, load_X / copies, -1.0)
        copies[int(np.argmax(per_copy))] += 1  # first of equals
    room = np.full(ep_size, n_experts // ep_size + spare_slots)
    work = np.zeros(ep_size)
    holders: list[list[int]] = [[] for _ in range(n_experts)]
    # Replicated experts first (each copy needs a rank of its own), then heaviest copy first.
    for e in sorted(range(n_experts), key=lambda e: (copies[e] == 1, -load_X[e] / copies[e], e)):
        for _ in range(copies[e]):
            open_ranks = np.array([r for r in np.flatnonzero(room > 0) if r not in holders[e]])
            if not len(open_ranks):
                raise ValueError(f"no rank left for copy {len(holders[e]) + 1} of expert {e}")
            least = [int(r) for r in open_ranks[work[open_ranks] == work[open_ranks].min()]]
            preferred = [r for r in least if current is not None and r in current[e]]
            rank = (preferred or least)[0]
            holders[e].append(rank)
            work[rank] += load_X[e] / copies[e]
            room[rank] -= 1
    return tuple(_owner_first(h, current[e] if current is not None else ()) for e, h in enumerate(holders))


def _owner_first(holders: list[int], current: tuple[int, ...]) -> tuple[int, ...]:
    """The holders in rank order, the current owner first when it still holds the expert (it keeps
    the copy checkpoints write)."""
    ordered = sorted(holders)
    if current and current[0] in ordered:
        ordered.remove(current[0])
        ordered.insert(0, current[0])
    return tuple(ordered)
