"""`parallelize(model, topo, groups, cfg)`: the model's parallel dimensions applied in a fixed order,
and what the training step needs of them afterwards.

Order (each step assumes the one before):
1. expert parallel: MoE layers dispatch over the EP group (their experts are already this rank's
   shard: the Potential is built with its EP coordinate);
   pipeline parallel: the model keeps only this rank's stage (blocks, embeddings on the first,
   readout on the last), and the step runs through the Topology's pipeline (PipelineStage);
   graph parallel: the model is unchanged; the step shards each micro-batch over the GP group
   (GraphParallel);
2. identical start: dense parameters from their stage's first rank (world rank 0 without pipeline
   stages), expert shards from their EDP group's first
   rank — after fine-tuning weights are loaded (rank 0's copy wins) and before the reducers exist;
3. gradient reduction: the bucketed reducers register their hooks last, on the final parameters
   (frozen ones are skipped).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from exaforce.comm.groups import CommGroups
from exaforce.config import Config
from exaforce.graph import GraphBatch
from exaforce.model.potential import Potential
from exaforce.model.routing import Routing
from exaforce.parallel.data_parallel import GradientReduction, clip_grad_norm, sync_initial_parameters
from exaforce.parallel.expert_parallel import apply_expert_parallel, step_routing
from exaforce.parallel.graph_parallel import GraphParallel
from exaforce.parallel.pipeline import PipelineStage, keep_stage, stage_ranges
from exaforce.parallel.pipeline_schedule import Pipeline
from exaforce.parallel.topology import Topology


@dataclass
class Parallel:
    """The parallel pieces of one run: the topology, its backend groups and the gradient reduction."""

    topo: Topology
    groups: CommGroups
    reduction: GradientReduction
    pipeline: PipelineStage | None = None  # pp > 1: this rank's stage
    graph: GraphParallel | None = None     # gp > 1: this rank's place in its GP group

    def routing(self, model: Potential, batch: GraphBatch, share_2C: np.ndarray | None = None) -> Routing | None:
        """This step's MoE routing plan (collective: one host allgather); None for dense models.
        share_2C: see step_routing (graph parallelism)."""
        return step_routing(model, batch, self.topo, share_2C)

    def clip_grad_norm(self, model: Potential, max_norm: float) -> float:
        """The global gradient norm before clipping (collective over the EP group and the pipeline)."""
        return clip_grad_norm(model, self.topo, max_norm)


def parallelize(model: Potential, topo: Topology, groups: CommGroups, cfg: Config) -> Parallel:
    """Collective: applies the parallel dimensions to `model` in place (see the module docstring)."""
    if topo.layout.ep > 1:
        apply_expert_parallel(model, groups.ep)
    pipeline = None
    if topo.layout.pp > 1:
        stages = Pipeline(topo.layout.pp, cfg.parallel.pp_chunks)
        ranges = stage_ranges(len(model.blocks), stages.stages, cfg.parallel.pp_split)
        keep_stage(model, stages.stages_of(topo.stage), ranges)
        pipeline = PipelineStage(model, topo, cfg, ranges)
    graph = None
    if topo.layout.gp > 1:
        graph = GraphParallel.for_model(topo, model, cfg.parallel.gp_min_atoms, cfg.parallel.gp_halo)
    sync_initial_parameters(model, groups)
    reduction = GradientReduction(model, groups, topo.layout.replicas, cfg.comm)
    return Parallel(topo=topo, groups=groups, reduction=reduction, pipeline=pipeline, graph=graph)
