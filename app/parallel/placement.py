"""Where each expert of an MoE layer should live: a placement that balances the EP ranks' expert work.

Element routing makes a step's work per expert known before its forward (token counts per
routing class × the routers' top-k tables: exaforce.model.routing), and the perf log records it
every step (`expert_load`). From such loads, `balanced_placement` assigns experts to EP ranks by
LPT (longest processing time first: the heaviest expert goes to the least-loaded rank that still
has room), the classic greedy for balancing a maximum. Every rank holds the same number of experts as in the default placement (its memory does not change);
among equally loaded ranks an expert stays where it is, so fewer experts move.

A placement changes no number: the routing plan sends each (token, slot) pair to its expert's
owner, whichever rank that is (tests/mpi/test_ep_equivalence.py, `scattered`).
"""

from __future__ import annotations

import numpy as np


def rank_work(load_X: np.ndarray, owner_X: np.ndarray, ep_size: int) -> np.ndarray:
    """Work per EP rank (the sum of its experts' loads)."""
    return np.bincount(owner_X, weights=load_X, minlength=ep_size)


def max_over_mean(load_X: np.ndarray, owner_X: np.ndarray, ep_size: int) -> float:
    """Max / mean over EP ranks of their work: 1 is perfect balance."""
    work = rank_work(load_X, owner_X, ep_size)
    return float(work.max() / work.mean()) if work.mean() > 0 else 1.0


def balanced_placement(load_X: np.ndarray, ep_size: int, current_X: np.ndarray | None = None) -> np.ndarray:
    """The owner of each expert: LPT over `load_X` (work per expert, e.g. rows over recent steps),
    X/ep experts per rank; ties between ranks go to the expert's `current_X` owner, then to the
    lower rank."""
    load_X = np.asarray(load_X, dtype=np.float64)
    n_experts = len(load_X)
    if n_experts % ep_size:
        raise ValueError(f"{n_experts} experts do not split evenly over {ep_size} EP ranks")
    room = np.full(ep_size, n_experts // ep_size)
    work = np.zeros(ep_size)
    owner_X = np.empty(n_experts, dtype=np.int64)
    for e in np.argsort(-load_X, kind="stable"):  # heaviest first; equal loads in index order
        open_ranks = np.flatnonzero(room > 0)
        least = open_ranks[work[open_ranks] == work[open_ranks].min()]
        rank = current_X[e] if current_X is not None and current_X[e] in least else least[0]
        owner_X[e] = rank
        work[rank] += load_X[e]
        room[rank] -= 1
    return owner_X
