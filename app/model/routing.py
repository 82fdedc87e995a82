"""The routing plan of one step: how many tokens go to which expert on which rank, as host integers.

Routing is by routing class c = head·Z + element (element and dataset/fidelity head), so every
split size of the expert-parallel all-to-all follows from two things known before the forward
starts: the number of tokens of each routing class on each rank of the EP group (from the
batch's composition, exchanged once per step on the host), and each MoE layer's top-k table (C×K
expert indices, copied to the host once per step for all layers). No split size is read back
from the device in the middle of the forward.

Token kinds: the edge-update MoE routes bonds (by their source atom's class), the node-update
MoE routes atoms. Shapes: R ranks of the EP group, W world ranks, C routing classes (heads × elements),
K top-k, X experts, Z elements.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

ATOMS, BONDS = 0, 1  # token kinds: rows of a 2×C count table (exaforce.graph.route_class_counts)


@dataclass(frozen=True)
class TokenCounts:
    """Tokens per routing class and kind on every rank of this rank's EP group, and over the world."""

    group_R2C: np.ndarray  # row r: EP-group rank r
    world_2C: np.ndarray   # summed over every rank (aux loss, expert-load statistics)
    ep_rank: int

    @classmethod
    def single(cls, counts_2C: np.ndarray) -> "TokenCounts":
        """One process holds everything (inference, serial reference)."""
        return cls(group_R2C=counts_2C[None], world_2C=counts_2C, ep_rank=0)



# A placement: for each expert the EP ranks holding it, its owner first (the copy checkpoints write and
# the gradient norm counts). An expert held by h ranks (replicas) has each source rank's pairs split
# in h consecutive pieces (by token order), piece j run by its j-th holder, sized every step from that
# step's counts (`holder_shares`).
Placement = tuple[tuple[int, ...], ...]


def contiguous_placement(n_experts: int, ep_size: int) -> Placement:
    """The default placement: X/ep consecutive experts per EP rank, no replicas."""
    return single_owner_placement(np.arange(n_experts) // (n_experts // ep_size))


def single_owner_placement(owner_X: Sequence[int]) -> Placement:
    """One holder per expert: `owner_X[e]`."""
    return tuple((int(o),) for o in owner_X)


def held_experts(placement: Placement, rank: int) -> list[int]:
    """The experts `rank` holds (owned or replicas), in the order they run (ascending index)."""
    return [e for e, h in enumerate(placement) if rank in h]


def holder_shares(load_X: np.ndarray, placement: Placement, n_ranks: int) -> list[np.ndarray]:
    """Each expert's share of this step's rows per holder (holder order): 1 for a single holder; a
    replicated expert's rows water-fill its holders, heaviest replicated expert first, on top of the
    rows the single-held experts give every rank — the step's counts are known before its forward,
    so the split balances this step, not a guess from earlier ones."""
    level = np.zeros(n_ranks)
    shares: list[np.ndarray] = [np.ones(1)] * len(placement)
    for e, holders in enumerate(placement):
        if len(holders) == 1:
            level[holders[0]] += load_X[e]
    replicated = [e for e, holders in enumerate(placement) if len(holders) > 1]
    for e in sorted(replicated, key=lambda e: (-load_X[e], e)):
        holders, load = list(placement[e]), float(load_X[e])
        if load <= 0:
            shares[e] = np.full(len(holders), 1 / len(holders))
            continue
        before = level[holders]
        ordered = np.sort(before)
        for k in range(1, len(ordered) + 1):  # water level: the k lowest holders fill up to it
            water = (load + ordered[:k].sum()) / k
            if k == len(ordered) or water <= ordered[k]:
                break
        shares[e] = np.maximum(water - before, 0.0) / load
        level[holders] = np.maximum(before, water)
    return shares


def split_pairs(pairs_RX: np.ndarray, placement: Placement, n_ranks: int) -> np.ndarray:
    """R×X×R: the pairs source rank r sends to rank p for expert e — every pair to its owner, or with
    h holders, consecutive pieces of each source's pairs in the proportions `holder_shares` gives
    (floor of the pairs times the cumulative shares, so the pieces add up exactly)."""
    pieces_RXP = np.zeros(pairs_RX.shape + (n_ranks,), dtype=np.int64)
    for e, (holders, share) in enumerate(zip(placement, holder_shares(pairs_RX.sum(0), placement, n_ranks))):
        n = pairs_RX[:, e]
        if len(holders) == 1:
            pieces_RXP[:, e, holders[0]] = n
            continue
        cumulative = np.minimum(np.cumsum(share), 1.0)
        cumulative[-1] = 1.0
        ends = np.floor(n[:, None] * cumulative[None]).astype(np.int64)  # R×h
        for j, rank in enumerate(holders):
            pieces_RXP[:, e, rank] += ends[:, j] - (ends[:, j - 1] if j else 0)
    return pieces_RXP


@dataclass(frozen=True)
class LayerRoute:
    """Everything one MoE layer needs to dispatch its tokens this step.

    Send order: this rank's (token, slot) pairs sorted by (destination rank, expert); an expert's
    pairs go to its owner or, with replicas, piece by piece to its holders (`holder_XH`,
    `piece_end_XH`). Receive order: by source rank, within it by local expert (a rank's experts in
    ascending index). Local experts run on rows grouped by expert (`to_expert_order`), and results
    go back in receive order.
    """

    expert_CK: np.ndarray             # top-k table used on every rank this step
    holder_XH: np.ndarray             # each expert's holders (padded with its owner), owner first
    piece_end_XH: np.ndarray          # where each holder's piece of this rank's pairs of an expert ends
    pairs_X: np.ndarray               # this rank's pairs per expert
    send_splits: tuple[int, ...]      # pairs to each EP rank
    recv_splits: tuple[int, ...]      # pairs from each EP rank
    expert_rows: tuple[int, ...]      # rows per local expert, all sources together
    to_expert_order: torch.Tensor | None   # receive order → expert order (None: already grouped)
    to_receive_order: torch.Tensor | None  # its inverse
    world_load_X: np.ndarray          # pairs per expert over the world
    rank_rows: tuple[int, ...]        # rows each rank of the EP group runs (its experts' pairs, all sources)

    def send_order(self, expert_P: torch.Tensor) -> torch.Tensor:
        """The permutation of this rank's pairs (`expert_P`: each pair's expert) into send order."""
        device, n_experts = expert_P.device, len(self.pairs_X)
        by_expert = torch.argsort(expert_P, stable=True)  # each expert's pairs together, in token order
        expert_sorted = expert_P.index_select(0, by_expert)
        pairs_X = torch.from_numpy(self.pairs_X).to(device)
        start_X = torch.cumsum(pairs_X, 0) - pairs_X
        within = torch.arange(len(expert_P), device=device) - start_X[expert_sorted]
        piece_end = torch.from_numpy(self.piece_end_XH).to(device)[expert_sorted]
        piece = torch.searchsorted(piece_end, within[:, None], right=True)[:, 0]  # split_pairs' pieces
        destination = torch.from_numpy(self.holder_XH).to(device)[expert_sorted, piece]
        return by_expert.index_select(0, torch.argsort(destination * n_experts + expert_sorted, stable=True))


def plan_layer(expert_CK: np.ndarray, group_RC: np.ndarray, world_C: np.ndarray, ep_rank: int,
               placement: Placement) -> LayerRoute:
    """Split sizes and the receive-side permutation for one layer, from counts, the top-k table and
    the placement (the EP ranks holding each expert)."""
    n_classes, top_k = expert_CK.shape
    n_ranks, n_experts = len(group_RC), len(placement)
    routed_CX = np.zeros((n_classes, n_experts), dtype=np.int64)
    np.put_along_axis(routed_CX, expert_CK, 1, axis=1)
    pairs_RX = group_RC @ routed_CX                       # pairs each rank sends to each expert
    pieces_RXP = split_pairs(pairs_RX, placement, n_ranks)
    send = pieces_RXP[ep_rank].sum(0)
    mine_RM = pieces_RXP[:, held_experts(placement, ep_rank), ep_rank]  # pairs for my experts, by source rank
    recv = mine_RM.sum(-1)
    to_expert = to_receive = None
    if n_ranks > 1:
        # Each received row's local expert; a stable sort groups them by expert, sources in order.
        expert_of_row = np.repeat(np.tile(np.arange(mine_RM.shape[1]), n_ranks), mine_RM.reshape(-1))
        order = np.argsort(expert_of_row, kind="stable")
        to_expert = torch.from_numpy(order)
        to_receive = torch.from_numpy(np.argsort(order, kind="stable"))
    width = max(len(h) for h in placement)
    holder_XH = np.array([h + (h[0],) * (width - len(h)) for h in placement], dtype=np.int64)
    mine_XH = np.take_along_axis(pieces_RXP[ep_rank], holder_XH, axis=1)  # my pieces in holder order
    mine_XH[np.arange(width)[None] >= np.array([len(h) for h in placement])[:, None]] = 0  # padding: empty
    return LayerRoute(expert_CK=expert_CK, holder_XH=holder_XH, piece_end_XH=np.cumsum(mine_XH, axis=1),
                      pairs_X=pairs_RX[ep_rank],
                      send_splits=tuple(int(s) for s in send), recv_splits=tuple(int(s) for s in recv),
                      expert_rows=tuple(int(s) for s in mine_RM.sum(0)), to_expert_order=to_expert,
                      to_receive_order=to_receive, world_load_X=world_C @ routed_CX,
                      rank_rows=tuple(int(s) for s in pieces_RXP.sum((0, 1))))


@dataclass
class DispatchClock:
    """What moving tokens between ranks costs (every dispatch and combine, forward and backward:
    seconds, calls, bytes sent to each rank of the group), and the host seconds of this rank's
    experts' forward (on a GPU: until their kernels are queued), for the perf log."""

    seconds: float = 0.0
    calls: int = 0
    sent_bytes: list[int] = field(default_factory=list)
    expert_seconds: float = 0.0

    def record(self, seconds: float, sent_bytes: Sequence[int]) -> None:
        """One all-to-all: its seconds and the bytes it sent to each rank."""
        self.seconds += seconds
        self.calls += 1
        if not self.sent_bytes:
            self.sent_bytes = [0] * len(sent_bytes)
        self.sent_bytes = [a + b for a, b in zip(self.sent_bytes, sent_bytes)]


@dataclass
class Routing:
    """The plan of every MoE layer for one micro-batch, and the clock its dispatchers add to."""

    layers: list[LayerRoute]
    counts: TokenCounts
    clock: DispatchClock = field(default_factory=DispatchClock)


def expert_load(routings: Sequence[Routing]) -> dict[str, Any]:
    """One step's expert statistics for the perf log (its micro-batches summed), per MoE layer:
    `max_over_mean` over experts of the world's routed (token, slot) pairs, `experts` those pairs,
    `ep_rank_rows` the rows each rank of this EP group ran; `rank_rows` the rows this rank's experts
    ran (all layers), `alltoall_bytes` what this rank sent to each EP rank (all layers, forward and
    both backwards), `expert_seconds` its experts' forward (host seconds)."""
    layers = range(len(routings[0].layers))
    world_X = [sum(r.layers[i].world_load_X for r in routings) for i in layers]
    rank_rows = [np.sum([r.layers[i].rank_rows for r in routings], axis=0) for i in layers]
    mine = routings[0].counts.ep_rank
    sent = [r.clock.sent_bytes for r in routings if r.clock.sent_bytes]  # none with ep = 1
    return {"max_over_mean": [round(float(w.max() / max(w.mean(), 1e-12)), 4) for w in world_X],
            "rank_rows": int(sum(int(rows[mine]) for rows in rank_rows)),
            "experts": [[int(v) for v in w] for w in world_X],
            "ep_rank_rows": [[int(v) for v in rows] for rows in rank_rows],
            "alltoall_bytes": [int(v) for v in np.sum(sent, axis=0)] if sent else [],
            "expert_seconds": round(sum(r.clock.expert_seconds for r in routings), 6)}
