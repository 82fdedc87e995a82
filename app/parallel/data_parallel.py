"""Data parallelism over the Topology (dp × ep): identical starting parameters, gradient reduction,
and the global gradient norm.

Dense parameters are replicated on every rank and summed over their stage's ranks (the world
without pipeline stages). Expert parameters live on one rank of each EP group and are summed over
their EDP group; both divide by the number of replicas (dp · ep: the shares of the global batch; the
ranks of a GP group hold parts of one share's gradient, which the sum adds up), so the result is the
gradient of the global mean loss, exactly as one process computes it. The global gradient norm
counts each expert once per EP group.
"""

from __future__ import annotations

import itertools
import math

import torch

from exaforce.comm.groups import CommGroups, Group
from exaforce.comm.reducer import GradReducer
from exaforce.config import CommConfig
from exaforce.model.potential import Potential
from exaforce.parallel.topology import Topology


def sync_initial_parameters(model: Potential, groups: CommGroups) -> None:
    """Dense parameters and buffers from the first rank of their stage; each expert shard from its
    EDP group's first rank."""
    expert = {id(p) for p in model.expert_parameters()}
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in expert:
            groups.replicas.broadcast_(tensor)  # collective
    for tensor in model.expert_parameters():
        groups.edp.broadcast_(tensor)  # collective


class GradientReduction:
    """Dense gradients over the world, expert gradients over their EDP group, overlapping the
    parameter backward (same collective order on every rank). Per step: `arm()` before the last
    micro-batch's backward, `finish()` after it."""

    def __init__(self, model: Potential, groups: CommGroups, replicas: int, comm: CommConfig):
        """replicas: how many shares the global batch is dealt into (dp · ep)."""
        self.groups, self.replicas, self.comm = groups, replicas, comm
        self.reducers = [GradReducer(model.dense_parameters(), groups.replicas, 1.0 / replicas, self._bucket_bytes,
                                     comm.overlap, "dense"), self._expert_reducer(model)]

    @property
    def _bucket_bytes(self) -> int:
        return int(self.comm.bucket_mb * 2**20)

    def _expert_reducer(self, model: Potential) -> GradReducer:
        return GradReducer(model.expert_parameters(), self.groups.edp, 1.0 / self.replicas, self._bucket_bytes,
                           self.comm.overlap, "expert")

    def experts_moved(self, model: Potential) -> None:
        """After expert placement changed (exaforce.parallel.expert_parallel.move_experts): the
        expert reducer over this rank's new expert parameters."""
        self.reducers[1].close()
        self.reducers[1] = self._expert_reducer(model)

    def arm(self) -> None:
        for reducer in self.reducers:
            reducer.arm()

    def finish(self, model: Potential) -> None:
        for reducer in self.reducers:
            reducer.finish()  # collectives: world, then EDP group
        sum_replica_gradients(model, self.groups.ep)

    @property
    def launches(self) -> int:
        return sum(r.launches for r in self.reducers)


def sum_replica_gradients(model: Potential, ep_group: Group) -> None:
    """Collective over the EP group when any expert has replicas (exaforce.parallel.placement): each
    holder has the gradient of the rows it ran; their sum, on every holder, is the expert's
    gradient, so the replicas take the same optimizer step. One flat all-reduce, zeros where a rank
    does not hold the expert (adding zeros is exact)."""
    replicated = model.replicated_experts()
    if not replicated:
        return
    like = model.expert_parameters()[0]
    offsets = [0, *itertools.accumulate(size for size, _ in replicated)]
    flat = like.new_zeros(offsets[-1])
    for (size, params), start in zip(replicated, offsets):
        if params:
            flat[start:start + size] = torch.cat([_grad(p).reshape(-1) for p in params])
    ep_group.allreduce_sum_async(flat, 1.0, "replicas").wait()
    for (size, params), start in zip(replicated, offsets):
        if not params:
            continue
        for p, part in zip(params, flat[start:start + size].split([q.numel() for q in params])):
            if p.grad is None:
                p.grad = torch.empty_like(p)
            p.grad.copy_(part.view_as(p))


def _grad(p: torch.nn.Parameter) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


def grad_norm(model: Potential, topo: Topology) -> float:
    """The global gradient norm, the same on every rank (collective over the EP group and the
    pipeline, on the host: one float, like every control value).

    After reduction dense gradients are equal across a stage's replicas (every rank without pipeline
    stages; the stages' squares are summed over the pipeline), and expert gradients are equal across
    an EDP group, so norm² = dense² + Σ over the EP group of each rank's owned experts² (replicas
    hold their owner's gradient: exaforce.parallel.placement). A NaN or inf in any rank's gradients
    makes it non-finite everywhere (the reductions spread it)."""
    def squares(params: list[torch.nn.Parameter]) -> float:
        return float(sum(p.grad.pow(2).sum() for p in params if p.grad is not None))  # host sync point

    stage = squares(model.dense_parameters()) + topo.ep_sum(squares(model.owned_expert_parameters()))
    return math.sqrt(topo.pp_sum(stage) if topo.layout.pp > 1 else stage)  # pipeline: Σ over the stages


def clip_grad_norm(model: Potential, topo: Topology, max_norm: float) -> float:
    """Scales all gradients so that the global norm is at most max_norm (0: never); returns the norm
    before (collective over the EP group and the pipeline)."""
    norm = grad_norm(model, topo)
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm
