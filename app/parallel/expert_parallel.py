"""Expert parallelism: the step's routing plan from the EP group's token counts, and the dispatcher
that moves (token, slot) rows to the ranks holding their experts and back.

The plan needs one host allgather per step of routing-class counts (element routing makes every
split size known from composition before the forward). The dispatcher is the differentiable
all-to-all of exaforce.comm.alltoall over the EP group's backend, so forces and the double
backward through it are exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from exaforce.comm.alltoall import all_to_all
from exaforce.comm.groups import Group
from exaforce.graph import GraphBatch
from exaforce.model.moe import MoEMLP
from exaforce.model.potential import Potential
from exaforce.model.routing import DispatchClock, LayerRoute, Placement, Routing, TokenCounts, held_experts
from exaforce.parallel.topology import Topology


class AllToAllDispatcher:
    """Rows go to the EP rank holding their expert and come back in the order they left; on the
    receiving rank they are regrouped by local expert (`route.to_expert_order`) and back."""

    def __init__(self, group: Group):
        self.group = group

    def dispatch(self, x_PF: torch.Tensor, route: LayerRoute, clock: DispatchClock) -> torch.Tensor:
        rows_RF = all_to_all(x_PF, route.send_splits, route.recv_splits, self.group, clock)  # collective
        if route.to_expert_order is not None:
            rows_RF = rows_RF.index_select(0, route.to_expert_order.to(rows_RF.device))
        return rows_RF

    def combine(self, y_RD: torch.Tensor, route: LayerRoute, clock: DispatchClock) -> torch.Tensor:
        if route.to_receive_order is not None:
            y_RD = y_RD.index_select(0, route.to_receive_order.to(y_RD.device))
        return all_to_all(y_RD, route.recv_splits, route.send_splits, self.group, clock)  # collective


def apply_expert_parallel(model: Potential, group: Group) -> None:
    """Every MoE layer dispatches over the EP group (ep > 1); its experts are already this rank's shard."""
    for layer in model.moe_layers:
        layer.dispatcher = AllToAllDispatcher(group)


def step_routing(model: Potential, batch: GraphBatch, topo: Topology, share_2C: np.ndarray | None = None) -> Routing | None:
    """This step's routing plan on every rank (collective: one host allgather of routing-class
    counts over the world gives the EP group's and the global batch's — summed over one stage's
    ranks, since every stage of a pipeline holds the same batch); None for dense models.
    `share_2C`: this rank's share of the global batch's tokens when it differs from the tokens it
    runs (graph parallelism: its owned atoms and their bonds, while it runs its halo too)."""
    if not model.moe_layers:
        return None
    share_2C = batch.route_counts_2C if share_2C is None else share_2C
    all_W22C = np.asarray(topo.allgather(np.stack([batch.route_counts_2C, share_2C])))  # collective
    layout = topo.layout
    counts = TokenCounts(group_R2C=all_W22C[list(layout.ep_group(topo.rank)), 0],
                         world_2C=all_W22C[list(layout.stage_group(topo.rank)), 1].sum(0), ep_rank=layout.ep_index(topo.rank))
    return model.plan_routing(counts)


# Per-parameter optimizer state that travels with an expert (AdamW's moments, the weight average).
_MOVING_STATE = ("exp_avg", "exp_avg_sq", "ema")


def move_experts(model: Potential, placements: Sequence[Placement], group: Group,
                 optimizer: torch.optim.Optimizer) -> int:
    """Collective over the EP group, at a step boundary: MoE layer i takes the placement
    placements[i]; each copy a rank gains (a moved expert or a new replica) comes from the expert's
    old owner, with its optimizer state, in one all-to-all per layer (rows: one expert each, its
    weights then each state tensor then its step count); copies a rank no longer holds are dropped.
    Nothing is recomputed, so the numbers of every later step are those of the old placement.
    Returns the bytes this rank sent. The caller rebuilds what holds expert parameters (the
    gradient reducer)."""
    sent = 0
    for layer, new in zip(model.moe_layers, placements):
        old, me = layer.placement, layer.ep_rank
        outgoing = sorted((rank, e) for e in layer.owned_experts() for rank in new[e] if rank not in old[e])
        incoming = sorted((old[e][0], e) for e in held_experts(new, me) if me not in old[e])
        template = next(iter(layer.experts.values()))
        like = next(template.parameters())
        state = optimizer.state.get(like, {})  # alike for every parameter
        keys = [k for k in _MOVING_STATE if k in state]
        step_dtype = state["step"].dtype if "step" in state else None
        rows = [_pack(layer.experts[str(e)], optimizer, keys, step_dtype is not None) for _, e in outgoing]
        width = layer.expert_numel * (1 + len(keys)) + int(step_dtype is not None)
        send_XD = torch.stack(rows) if rows else like.new_zeros((0, width))
        received = group.alltoallv(send_XD, [sum(r == p for r, _ in outgoing) for p in range(group.size)],
                                   [sum(r == p for r, _ in incoming) for p in range(group.size)])  # collective
        kept = {}
        for e in layer.local_experts():
            if me in new[e]:
                kept[str(e)] = layer.experts[str(e)]
            else:
                for p in layer.experts[str(e)].parameters():
                    optimizer.state.pop(p, None)
        for row, (_, e) in zip(received, incoming):
            kept[str(e)] = _unpack(row, layer, optimizer, keys, step_dtype)
        layer.placement = tuple(new)
        layer.experts = torch.nn.ModuleDict({k: kept[k] for k in sorted(kept, key=int)})
        sent += send_XD.numel() * send_XD.element_size()
    optimizer.param_groups[0]["params"] = list(model.parameters())  # one AdamW group (make_optimizer)
    return sent


def _pack(expert: torch.nn.Module, optimizer: torch.optim.Optimizer, keys: list[str], stepped: bool) -> torch.Tensor:
    params = list(expert.parameters())
    parts = [p.detach().reshape(-1) for p in params]
    parts += [optimizer.state[p][k].reshape(-1) for k in keys for p in params]
    if stepped:
        parts.append(optimizer.state[params[0]]["step"].to(params[0].device, params[0].dtype).reshape(1))
    return torch.cat(parts)


def _unpack(row: torch.Tensor, layer: MoEMLP, optimizer: torch.optim.Optimizer, keys: list[str],
            step_dtype: torch.dtype | None) -> torch.nn.Module:
    expert = layer.new_expert().to(row.device, row.dtype)
    params = list(expert.parameters())
    chunks = iter(row.split([p.numel() for p in params] * (1 + len(keys)) + [1] * int(step_dtype is not None)))
    with torch.no_grad():
        for p in params:
            p.copy_(next(chunks).view_as(p))
    for k in keys:
        for p in params:
            optimizer.state[p][k] = next(chunks).view_as(p).clone()
    if step_dtype is not None:
        step = float(next(chunks))
        for p in params:
            optimizer.state[p]["step"] = torch.tensor(step, dtype=step_dtype)
    return expert
