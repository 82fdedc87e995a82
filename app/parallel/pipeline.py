"""Pipeline parallelism (parallel.pp): the interaction blocks split into contiguous stages over the
ranks of a pipeline, and the training step's four phases run through them micro-batch by micro-batch.

Stage s holds blocks `ranges[s]`; the first also the embeddings, the last also the readout. With
parallel.pp_chunks = v there are pp·v stages and rank r runs stages r, r + pp, … (interleaved: each
phase passes every rank v times; exaforce.parallel.pipeline_schedule says why). Every
stage builds the geometry (edge vectors from positions and strain) of every micro-batch itself and
computes the features its blocks read, so every stage contributes to ∂E/∂positions and ∂E/∂strain.
The phases of one micro-batch on stage s (see exaforce.parallel.pipeline_schedule for the order):

    1 forward           state_in (received; S1: the embeddings) → blocks → state_out (sent on); SP: E
    2 force backward    g = ∂E/∂state_out (received; SP: 1) → autograd.grad(create_graph) gives
                        ∂E/∂state_in (sent back) and this stage's ∂E/∂r, ∂E/∂ε, added to the sums
                        that travel with it; S1 has E, the forces and the virial: the loss and its
                        adjoints Ē, F̄, S̄
    3 loss backward I   ḡ = ∂L/∂g from this stage's force-backward graph alone (autograd.grad to
                        the received g), given ∂L/∂(what it sent back in phase 2) — sent on
    4 loss backward II  one backward of everything the stage made (force-backward outputs with their
                        adjoints, state_out with ∂L/∂state_out received from the next stage) into the
                        parameters and state_in; ∂L/∂state_in sent back

Transfers happen between phases, on leaves: a stage's graph starts at the tensors it received (leaves
that require grad) and ends at the tensors it sends, so no pipeline transfer sits inside a backward and
every gradient — the second-order ones included — is the single-process one, summed in another
order (float64 tests: 1e-10). Phase 3 is the one piece of work a pipeline adds (the ḡ path runs again
inside phase 4's backward); `exaforce bench pp` measures it.

Transfers go over the Topology's pipeline communicator (MPI point to point; device tensors are
staged through host memory), one message per (phase, micro-batch, receiving stage), tagged
4·(micro·stages + stage) + phase: sends are non-blocking and every rank receives in its schedule's
order, so any order that the simulator can run without deadlock runs here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from exaforce.config import Config
from exaforce.graph import GraphBatch
from exaforce.loss import structure_losses
from exaforce.model.potential import Potential, State, prediction, strained_geometry
from exaforce.model.recompute import Recompute
from exaforce.model.routing import Routing
from exaforce.parallel.pipeline_schedule import Op, Pipeline, schedule
from exaforce.parallel.topology import Topology


def stage_ranges(blocks: int, stages: int, split: Sequence[int] = ()) -> list[range]:
    """Contiguous block ranges per stage (pp·pp_chunks of them): `split` (blocks per stage, checked by
    config.validate) or as equal as possible (the blocks of a model are the same ops on the same sizes, so equal counts are
    equal costs; the first stage's embeddings and the last's readout are a few per cent of a block)."""
    counts = list(split) or [blocks // stages + (1 if s < blocks % stages else 0) for s in range(stages)]
    starts = [sum(counts[:s]) for s in range(stages)]
    return [range(start, start + n) for start, n in zip(starts, counts)]


def keep_stage(model: Potential, stages: Sequence[int], ranges: list[range]) -> None:
    """Drops what this rank's `stages` do not run from `model`, in place. Kept modules keep their names
    (blocks.3.… stays blocks.3.…), so the ranks' state dicts together are the whole model's."""
    first, last = 0 in stages, len(ranges) - 1 in stages
    kept = {i for s in stages for i in ranges[s]}
    for i in range(len(model.blocks)):
        if i not in kept:
            model.blocks[i] = torch.nn.Identity()
    if not first:
        model.embedding = model.edge_embedding = model.triplet_embedding = model.head_embedding = None
    if not last:
        model.readout_norm = model.readout = None
    model.renumber_moe_layers()


@dataclass
class _Micro:
    """What one micro-batch keeps on this stage between its phases."""

    batch: GraphBatch
    geometry: Any = None
    state_in: tuple[torch.Tensor, ...] = ()      # received leaves (none on the first stage)
    out: tuple[torch.Tensor, ...] = ()           # state_out, or (E,) on the last stage
    g: tuple[torch.Tensor, ...] = ()             # received ∂E/∂state_out, leaves
    force_outputs: list[torch.Tensor] = field(default_factory=list)   # ∂E/∂state_in, ∂E/∂r, ∂E/∂ε of this stage
    adjoints: list[torch.Tensor] = field(default_factory=list)        # ∂L/∂ of each force output
    carried: tuple[torch.Tensor, ...] = ()       # E, Σ ∂E/∂r, Σ ∂E/∂ε (phase 2) or Ē, F̄, S̄ (phase 3)
    losses: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class OpTime:
    """When an op ran on this stage in the last step (seconds from the step's start) and how long it
    waited for its message: its work is end − start − waited."""

    op: Op
    start: float
    end: float
    waited: float


class Transport:
    """Point-to-point messages between neighbouring stages: lists of tensors packed into one buffer."""

    def __init__(self, topo: Topology, pipeline: Pipeline):
        self.comm, self.pipeline = topo.pp_comm, pipeline
        self._sends: list[tuple[Any, torch.Tensor]] = []
        self.wait_seconds = 0.0

    def send(self, tensors: Sequence[torch.Tensor], to_stage: int, op: Op) -> None:
        """Non-blocking; the packed buffer lives until its send completes (checked at each send)."""
        self._sends = [(request, flat) for request, flat in self._sends if not request.Test()]
        flat = torch.cat([t.detach().reshape(-1).to("cpu") for t in tensors])
        self._sends.append((self.comm.Isend(flat.numpy(), dest=self.pipeline.rank(to_stage),
                                            tag=self._tag(op, to_stage)), flat))

    def recv(self, like: Sequence[tuple[torch.Size, torch.dtype]], from_stage: int, op: Op,
             device: torch.device) -> list[torch.Tensor]:
        flat = torch.empty(sum(s.numel() for s, _ in like), dtype=like[0][1])
        t0 = time.perf_counter()
        self.comm.Recv(flat.numpy(), source=self.pipeline.rank(from_stage), tag=self._tag(op, op.stage))
        self.wait_seconds += time.perf_counter() - t0
        out, offset = [], 0
        for shape, dtype in like:
            out.append(flat[offset:offset + shape.numel()].view(shape).to(device=device, dtype=dtype))
            offset += shape.numel()
        return out

    def _tag(self, op: Op, receiving_stage: int) -> int:
        return 4 * (op.micro * self.pipeline.stages + receiving_stage) + op.phase

    def finish(self) -> None:
        from mpi4py import MPI

        MPI.Request.Waitall([request for request, _ in self._sends])
        self._sends.clear()


def _leaves(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(t.requires_grad_(True) for t in tensors)


def _differentiable(tensors: Sequence[torch.Tensor], adjoints: Sequence[torch.Tensor]
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The tensors that require grad, and their adjoints (a stage's output that does not depend on
    anything trainable, such as a constant, has no graph to go back through)."""
    pairs = [(t, a) for t, a in zip(tensors, adjoints) if t.requires_grad]
    return [t for t, _ in pairs], [a for _, a in pairs]


def _or_zeros(grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, like)]


class PipelineStage:
    """This rank's stage(s) of the model (pp_chunks of them) and the four phases of a step on them."""

    def __init__(self, model: Potential, topo: Topology, cfg: Config, ranges: list[range]):
        self.model, self.cfg, self.ranges, self.topo = model, cfg, ranges, topo
        self.pipeline = Pipeline(topo.layout.pp, cfg.parallel.pp_chunks)
        self.rank = topo.stage                                # this rank's place in the pipeline
        self.stages = self.pipeline.stages_of(self.rank)      # the stages it runs
        self.last_stage = self.pipeline.stages - 1
        self.transport = Transport(topo, self.pipeline)
        self.timeline: list[OpTime] = []  # the last step's ops (exaforce bench pp)
        self.loss_scale = 1.0              # the step's (train_step's loss_scale), set by run()

    # ------------------------------------------------------------------------------- one step
    def run(self, micro_batches: list[GraphBatch], routings: list[Routing | None], plans: list[Recompute | None],
            loss_scale: float, times: dict[str, float], aux_world_2C: Any = None) -> dict[str, float]:
        """Every op of this rank's stages in the schedule's order; returns the loss sums over the
        micro-batches (on the rank of stage 0; none elsewhere) and, for MoE models, "moe_aux" of the whole model (collective
        over the pipeline). Parameter gradients accumulate in .grad."""
        orders = schedule(self.cfg.parallel.pp_schedule, self.pipeline.pp, len(micro_batches),
                          self.cfg.parallel.pp_alive, chunks=self.pipeline.chunks)
        micros: dict[tuple[int, int], _Micro] = {}  # by (micro-batch, stage)
        loss_sums: dict[str, float] = {}
        phases = (None, self._forward, self._force_backward, self._loss_backward_1, self._loss_backward_2)
        self.loss_scale = loss_scale
        self.transport.wait_seconds = 0.0
        self.timeline = []
        start = time.perf_counter()
        for op in orders[self.rank]:
            t0, waited = time.perf_counter(), self.transport.wait_seconds
            if op.phase == 1:
                micros[(op.micro, op.stage)] = _Micro(micro_batches[op.micro])
            phases[op.phase](micros[(op.micro, op.stage)], op, routings[op.micro], plans[op.micro])
            if op.phase == 4:  # the losses are on stage 0's
                for key, value in micros.pop((op.micro, op.stage)).losses.items():
                    loss_sums[key] = loss_sums.get(key, 0.0) + value
            t1 = time.perf_counter()
            self.timeline.append(OpTime(op, t0 - start, t1 - start, self.transport.wait_seconds - waited))
            times[f"pp_phase{op.phase}"] = times.get(f"pp_phase{op.phase}", 0.0) + t1 - t0
        self.transport.finish()
        times["pp_wait"] = times.get("pp_wait", 0.0) + self.transport.wait_seconds
        # the perf log's fields (waits for the neighbours' messages included; pp_wait says how much)
        for key, phases in (("forward", (1,)), ("force_backward", (2,)), ("param_backward", (3, 4))):
            times[key] = sum(times.get(f"pp_phase{phase}", 0.0) for phase in phases)
        times["alltoall"] = times.get("alltoall", 0.0) + sum(r.clock.seconds for r in routings if r is not None)
        if self.model.moe_layers:  # each stage's layers' share of the load-balancing loss (its routers only)
            aux = self.model.aux_loss(routings[-1], aux_world_2C)
            (self.cfg.loss.moe_aux_weight * aux).backward()
            loss_sums["moe_aux"] = self.topo.pp_sum(float(aux.detach()))  # collective
        return loss_sums

    def _state_like(self, batch: GraphBatch) -> list[tuple[torch.Size, torch.dtype]]:
        """Shapes of the state between blocks: atoms, bonds (, triplets) × width."""
        d, dtype = self.model.cfg.width, batch.positions_N3.dtype
        rows = [batch.species_N.shape[0], batch.edge_index_2E.shape[1]]
        if self.model.cfg.block == "matris":
            rows.append(batch.triplet_index_2T.shape[1])
        return [(torch.Size((n, d)), dtype) for n in rows]

    @staticmethod
    def _carried_like(batch: GraphBatch) -> list[tuple[torch.Size, torch.dtype]]:
        """E per graph, Σ ∂E/∂r, Σ ∂E/∂ε (and their adjoints)."""
        dtype = batch.positions_N3.dtype
        return [(torch.Size((batch.n_graphs,)), dtype), (batch.positions_N3.shape, dtype),
                (batch.cell_G33.shape, dtype)]

    # ------------------------------------------------------------------------------- phases
    def _forward(self, micro: _Micro, op: Op, routing: Routing | None, plan: Recompute | None) -> None:
        model, batch = self.model, micro.batch
        micro.geometry = geometry = strained_geometry(batch)
        features = model.geometry_features(geometry.vectors_E3, batch.triplet_index_2T)
        head_N = batch.head_G[batch.graph_N]
        if op.stage == 0:
            state: State = model.embed(batch.species_N, head_N, features)
        else:
            micro.state_in = state = _leaves(self.transport.recv(self._state_like(batch), op.stage - 1, op,
                                                                 batch.positions_N3.device))
        state = model.run_blocks(self.ranges[op.stage], state, features, model.routing_class(batch.species_N, head_N),
                                 batch.edge_index_2E, batch.triplet_index_2T, routing, plan)
        if op.stage == self.last_stage:
            micro.out = (model.read_out(state[0], batch.species_N, head_N, batch.graph_N, batch.n_graphs),)
        else:
            micro.out = tuple(state)
            self.transport.send(micro.out, op.stage + 1, op)

    def predict(self, batch: GraphBatch, routing: Routing | None = None) -> dict[str, torch.Tensor]:
        """Energy, forces and stress of one batch through the pipeline (phases 1 and 2, no graph kept):
        on the first stage {"energy", "forces", "stress"}, elsewhere {} (collective over the pipeline;
        outside a step)."""
        micros = {stage: _Micro(batch) for stage in self.stages}
        for stage in self.stages:
            self._forward(micros[stage], Op(1, 0, stage), routing, None)
        for stage in reversed(self.stages):
            self._force_backward(micros[stage], Op(2, 0, stage), training=False)
        self.transport.finish()
        if self.rank != 0:
            return {}
        micro = micros[0]
        pred = prediction(*micro.carried, batch)
        return {"energy": pred.energy_G, "forces": pred.forces_N3, "stress": pred.stress_G6}

    def _force_backward(self, micro: _Micro, op: Op, *_: Any, training: bool = True) -> None:
        batch, geometry = micro.batch, micro.geometry
        device = batch.positions_N3.device
        if op.stage == self.last_stage:
            micro.g = (torch.ones_like(micro.out[0]),)
        else:
            received = self.transport.recv(self._state_like(batch) + self._carried_like(batch), op.stage + 1, op,
                                           device)
            micro.g = _leaves(received[:-3])
            carried = received[-3:]
        inputs = (*micro.state_in, geometry.positions_N3, geometry.strain_G33)
        grads = torch.autograd.grad(micro.out, inputs, grad_outputs=micro.g, create_graph=training, allow_unused=True)
        micro.force_outputs = _or_zeros(grads, inputs)
        grad_pos_N3, grad_strain_G33 = micro.force_outputs[-2:]
        if op.stage == self.last_stage:
            micro.carried = (micro.out[0].detach(), grad_pos_N3.detach(), grad_strain_G33.detach())
        else:
            micro.carried = (carried[0], carried[1] + grad_pos_N3.detach(), carried[2] + grad_strain_G33.detach())
        if op.stage != 0:
            self.transport.send([*micro.force_outputs[:-2], *micro.carried], op.stage - 1, op)
            return
        if not training:
            return
        # The first stage holds E and the whole gradients: the loss, and its adjoints for phases 3 and 4.
        energy_G, grad_pos_N3, grad_strain_G33 = _leaves([t.clone() for t in micro.carried])
        losses = structure_losses(prediction(energy_G, grad_pos_N3, grad_strain_G33, batch), batch, self.cfg.loss)
        objective = losses["total"].sum() * self.loss_scale
        micro.carried = tuple(torch.autograd.grad(objective, (energy_G, grad_pos_N3, grad_strain_G33)))
        micro.losses = {k: float(v.detach().sum()) for k, v in losses.items()}

    def _loss_backward_1(self, micro: _Micro, op: Op, *_: Any) -> None:
        batch = micro.batch
        if op.stage == 0:
            from_before: list[torch.Tensor] = []
        else:
            received = self.transport.recv(self._state_like(batch) + self._carried_like(batch), op.stage - 1, op,
                                           batch.positions_N3.device)
            from_before, micro.carried = received[:-3], tuple(received[-3:])
        _, force_bar, strain_bar = micro.carried
        micro.adjoints = [*from_before, force_bar, strain_bar]
        if op.stage == self.last_stage:
            return  # its g is the constant 1: nothing to send on
        outputs, adjoints = _differentiable(micro.force_outputs, micro.adjoints)
        g_bar = torch.autograd.grad(outputs, micro.g, grad_outputs=adjoints, retain_graph=True, allow_unused=True)
        self.transport.send([*_or_zeros(g_bar, micro.g), *micro.carried], op.stage + 1, op)

    def _loss_backward_2(self, micro: _Micro, op: Op, *_: Any) -> None:
        batch = micro.batch
        if op.stage == self.last_stage:
            out_bar = [micro.carried[0]]
        else:
            out_bar = self.transport.recv(self._state_like(batch), op.stage + 1, op, batch.positions_N3.device)
        outputs, adjoints = _differentiable([*micro.force_outputs, *micro.out], [*micro.adjoints, *out_bar])
        targets = [p for p in self.model.parameters() if p.requires_grad] + list(micro.state_in)
        torch.autograd.backward(outputs, grad_tensors=adjoints, inputs=targets)
        if op.stage != 0:
            self.transport.send(_or_zeros([x.grad for x in micro.state_in], micro.state_in), op.stage - 1, op)
