"""Expert parallelism: the step's routing plan from the EP group's token counts, and the dispatcher
that moves (token, slot) rows to the ranks holding their experts and back.

The plan needs one host allgather per step of routing-class counts (element routing makes every
split size known from composition before the forward). The dispatcher is the differentiable
all-to-all of exaforce.comm.alltoall over the EP group's backend, so forces and the double
backward through it are exact.
"""

from __future__ import annotations

import numpy as np
import torch

from exaforce.comm.alltoall import all_to_all
from exaforce.comm.groups import Group
from exaforce.graph import GraphBatch
from exaforce.model.potential import Potential
from exaforce.model.routing import DispatchClock, LayerRoute, Routing, TokenCounts
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
