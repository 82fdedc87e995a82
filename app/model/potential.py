"""The interatomic potential: energy of a batch of structures, and forces/stress as its derivatives.

Shape legend: N atoms, E edges, T triplets, G graphs, D channels, R radial basis, A angle basis,
H energy heads, X elements (reference_energy_HX).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from ase.data import atomic_numbers
from torch import nn

from exaforce.config import ModelConfig
from exaforce.model.basis import BesselBasis, chebyshev_angle_basis, polynomial_envelope
from exaforce.model.blocks import Halo, InteractionBlock
from exaforce.model.matris_block import MatrisBlock
from exaforce.model.layers import GatedMLP, RMSNorm
from exaforce.graph import GraphBatch
from exaforce.model.moe import MoEMLP, load_balancing_loss
from exaforce.model.offload import ExpertOffload
from exaforce.model.recompute import Recompute, recompute
from exaforce.model.routing import Routing, TokenCounts, plan_layer


State = tuple[torch.Tensor, ...]  # what flows from block to block: atoms, bonds (, triplets)


@dataclass
class GeometryFeatures:
    """The geometry as the blocks read it (each a function of the edge vectors)."""

    edge_weight_E: torch.Tensor     # radial envelope: a bond's weight in the atom-graph attention
    radial_ER: torch.Tensor         # Bessel basis
    angle_TA: torch.Tensor          # Chebyshev basis of each triplet's angle
    triplet_weight_T: torch.Tensor  # product of the two bonds' three-body envelopes


class Potential(nn.Module):
    """Embeddings → blocks × [line-graph attention, atom-graph attention] → per-atom energy → sum."""

    def __init__(self, cfg: ModelConfig, ep_rank: int = 0, ep_size: int = 1):
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.embedding = nn.Embedding(len(cfg.elements), d)
        self.radial = BesselBasis(cfg.cutoff, cfg.radial_basis, cfg.envelope_p)
        self.edge_embedding = nn.Linear(cfg.radial_basis, d, bias=False)
        self.blocks = nn.ModuleList(MatrisBlock(cfg, last=i == cfg.blocks - 1) if cfg.block == "matris"
                                    else InteractionBlock(cfg, ep_rank, ep_size) for i in range(cfg.blocks))
        # MatRIS's per-triplet state starts from the angle basis
        self.triplet_embedding = nn.Linear(cfg.angle_basis, d, bias=False) if cfg.block == "matris" else None
        n_heads = len(cfg.heads)
        self.head_embedding = nn.Embedding(n_heads, d) if n_heads > 1 else None  # dataset/fidelity
        self.readout_norm = RMSNorm(d)
        self.readout = GatedMLP(d, d, n_heads)  # one energy column per head on a shared backbone
        # Fitted per head from the training data (trainer), saved with the weights, not trained.
        self.register_buffer("reference_energy_HX", torch.zeros(n_heads, len(cfg.elements)))
        self.register_buffer("energy_scale_H", torch.ones(n_heads))
        self.renumber_moe_layers()
        self.offload: ExpertOffload | None = None  # parallel.resident_experts (exaforce.model.offload)

    def renumber_moe_layers(self) -> None:
        """The MoE layers this model holds, numbered in order (their index in a Routing); again after
        a pipeline stage dropped the blocks it does not run."""
        self.moe_layers: list[MoEMLP] = [m for m in self.modules() if isinstance(m, MoEMLP)]
        for index, layer in enumerate(self.moe_layers):
            layer.layer_index = index

    def expert_parameters(self) -> list[nn.Parameter]:
        """Parameters sharded over the EP group (reduced over the EDP group); the rest is dense."""
        return [p for layer in self.moe_layers for p in layer.experts.parameters()]

    def owned_expert_parameters(self) -> list[nn.Parameter]:
        """The expert parameters without replicas held for another rank's expert (each counted once)."""
        return [p for layer in self.moe_layers for e in layer.owned_experts() for p in layer.experts[str(e)].parameters()]

    def replicated_experts(self) -> list[tuple[int, list[nn.Parameter]]]:
        """Every replicated expert of every MoE layer, the same list on every EP rank: its size
        (parameters) and its parameters here (none where this rank does not hold it)."""
        return [(layer.expert_numel, list(layer.experts[str(e)].parameters()) if str(e) in layer.experts else [])
                for layer in self.moe_layers for e in layer.replicated()]

    def dense_parameters(self) -> list[nn.Parameter]:
        expert = {id(p) for p in self.expert_parameters()}
        return [p for p in self.parameters() if id(p) not in expert]

    def plan_routing(self, counts: TokenCounts) -> Routing:
        """This step's routing for every MoE layer: all top-k tables reach the host in one copy."""
        tables = torch.stack([m.router.top_k_table() for m in self.moe_layers]).cpu().numpy() \
            if self.moe_layers else []
        layers = [plan_layer(table, counts.group_R2C[:, m.token_kind], counts.world_2C[m.token_kind],
                             counts.ep_rank, m.placement) for table, m in zip(tables, self.moe_layers)]
        return Routing(layers=layers, counts=counts)

    def aux_loss(self, routing: Routing, world_2C: np.ndarray | None = None) -> torch.Tensor:
        """Σ over MoE layers of the load-balancing loss on the world's tokens (same on every rank),
        with the step's top-k tables; `world_2C` defaults to this routing's world counts."""
        counts_2C = routing.counts.world_2C if world_2C is None else world_2C
        total = self.energy_scale_H.new_zeros(())
        for layer, route in zip(self.moe_layers, routing.layers):
            tokens_C = torch.from_numpy(counts_2C[layer.token_kind]).to(total.device)
            expert_CK = torch.from_numpy(route.expert_CK).to(total.device)
            total = total + load_balancing_loss(layer.router.probabilities(), expert_CK, tokens_C)
        return total

    def species_table(self) -> np.ndarray:
        """Maps atomic number → element index; −1 for elements the model does not know."""
        table = np.full(119, -1, dtype=np.int64)
        for index, symbol in enumerate(self.cfg.elements):
            table[atomic_numbers[symbol]] = index
        return table

    def forward(self, species_N: torch.Tensor, vectors_E3: torch.Tensor, edge_index_2E: torch.Tensor,
                triplet_index_2T: torch.Tensor, graph_N: torch.Tensor, n_graphs: int, head_G: torch.Tensor,
                routing: Routing | None = None, plan: Recompute | None = None,
                readout_atoms: torch.Tensor | None = None, halo: Halo | None = None) -> torch.Tensor:
        """Energy of each graph (eV) with its head's readout and references; all geometry enters
        through vectors_E3. `routing` (from plan_routing) is required when the model has MoE layers.
        `readout_atoms`: the atoms whose energies are summed (default all; graph parallelism: the
        atoms this rank owns, the others being its halo). `halo`: graph parallelism's per-block
        exchange of halo features (light block only).

        With a plan (training): both attentions are fused ops with hand-written first and second
        derivatives that sweep their lines in chunks (exaforce.model.fused_attention), and each
        block's bond update is recomputed (exaforce.model.recompute, InteractionBlock), so neither
        the forward's nor the force backward's graph keeps per-line or per-bond intermediates for
        the loss's backward. None: plain autograd (the reference)."""
        features = self.geometry_features(vectors_E3, triplet_index_2T, plan.geometry_lines if plan else 0)
        head_N = head_G[graph_N]
        state = self.embed(species_N, head_N, features)
        state = self.run_blocks(range(len(self.blocks)), state, features, self.routing_class(species_N, head_N),
                                edge_index_2E, triplet_index_2T, routing, plan, halo)
        node_ND = state[0]
        if readout_atoms is not None:
            node_ND, species_N, head_N, graph_N = (t.index_select(0, readout_atoms)
                                                   for t in (node_ND, species_N, head_N, graph_N))
        return self.read_out(node_ND, species_N, head_N, graph_N, n_graphs)

    # The pieces of forward, in order. A pipeline stage (exaforce.parallel.pipeline) runs a contiguous
    # run of them: the first stage embeds, every stage computes the geometry features it consumes,
    # the last reads out.
    def geometry_features(self, vectors_E3: torch.Tensor, triplet_index_2T: torch.Tensor,
                          chunk: int = 0) -> GeometryFeatures:
        """Everything the blocks read of the geometry; differentiable in vectors_E3 (to any order).
        chunk > 0: the triplet features are recomputed units of `chunk` triplets that store only
        vectors_E3 (exaforce.model.recompute), so their intermediates never exist for every triplet at once."""
        r_E = vectors_E3.norm(dim=-1)
        if chunk and triplet_index_2T.shape[1]:
            units = [recompute(partial(self.triplet_features, triplet_index_2T=triplet_index_2T[:, start:start + chunk]),
                               (vectors_E3,), ()) for start in range(0, triplet_index_2T.shape[1], chunk)]
            angle_TA, triplet_weight_T = (torch.cat(pieces) for pieces in zip(*units))
        else:
            angle_TA, triplet_weight_T = self.triplet_features(vectors_E3, triplet_index_2T=triplet_index_2T)
        return GeometryFeatures(edge_weight_E=self.radial.envelope(r_E), radial_ER=self.radial(r_E),
                                angle_TA=angle_TA, triplet_weight_T=triplet_weight_T)

    def triplet_features(self, vectors_E3: torch.Tensor, *, triplet_index_2T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The Chebyshev basis of each triplet's angle and the product of its two bonds' three-body envelopes."""
        a_T3, b_T3 = vectors_E3[triplet_index_2T[0]], vectors_E3[triplet_index_2T[1]]
        ra_T, rb_T = a_T3.norm(dim=-1), b_T3.norm(dim=-1)
        cos_T = (a_T3 * b_T3).sum(-1) / (ra_T * rb_T)
        cutoff, p = self.cfg.three_body_cutoff, self.cfg.envelope_p
        return (chebyshev_angle_basis(cos_T, self.cfg.angle_basis),
                polynomial_envelope(ra_T / cutoff, p) * polynomial_envelope(rb_T / cutoff, p))

    def routing_class(self, species_N: torch.Tensor, head_N: torch.Tensor) -> torch.Tensor:
        """MoE routing class of each atom: fidelity × element."""
        return head_N * len(self.cfg.elements) + species_N

    def embed(self, species_N: torch.Tensor, head_N: torch.Tensor, features: GeometryFeatures) -> State:
        """The blocks' starting state: atoms, bonds (and, for the matris block, triplets)."""
        node_ND = self.embedding(species_N)
        if self.head_embedding is not None:
            node_ND = node_ND + self.head_embedding(head_N)
        edge_ED = self.edge_embedding(features.radial_ER)
        if self.triplet_embedding is None:
            return (node_ND, edge_ED)
        return (node_ND, edge_ED, self.triplet_embedding(features.angle_TA))  # MatRIS's per-triplet state

    def run_blocks(self, indices: range, state: State, features: GeometryFeatures, class_N: torch.Tensor,
                   edge_index_2E: torch.Tensor, triplet_index_2T: torch.Tensor, routing: Routing | None = None,
                   plan: Recompute | None = None, halo: Halo | None = None) -> State:
        """The blocks `indices`, in order. The matris block runs plain autograd (no plan applies) and
        no halo exchange. With a halo, the atoms' halo is refreshed between blocks (the readout
        reads owned atoms only, so not after the last)."""
        if halo is not None and self.cfg.block != "light":
            raise ValueError(f"a per-block halo exchange needs model.block = 'light', not {self.cfg.block!r}")
        for i in indices:
            block = self.blocks[i]
            if self.cfg.block == "light":
                if halo is not None and i != indices[0]:
                    state = (halo.atoms(state[0]), *state[1:])
                state = block(*state, class_N, edge_index_2E, features.edge_weight_E, triplet_index_2T,
                              features.angle_TA, features.triplet_weight_T, routing, plan, halo)
            else:
                state = block(*state, edge_index_2E, features.edge_weight_E, triplet_index_2T,
                              features.triplet_weight_T, features.radial_ER)
        return state

    def read_out(self, node_ND: torch.Tensor, species_N: torch.Tensor, head_N: torch.Tensor, graph_N: torch.Tensor,
                 n_graphs: int) -> torch.Tensor:
        """Per-atom energies with each head's scale and reference energies, summed per graph."""
        readout_NH = self.readout(self.readout_norm(node_ND))
        atom_energy_N = self.energy_scale_H[head_N] * readout_NH.gather(1, head_N[:, None]).squeeze(-1)
        atom_energy_N = atom_energy_N + self.reference_energy_HX[head_N, species_N]
        return torch.zeros(n_graphs, dtype=atom_energy_N.dtype, device=atom_energy_N.device).index_add(
            0, graph_N, atom_energy_N)


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Total, dense, expert and active-per-token parameter counts, from a model built on the meta
    device (no memory). Active: what one atom (or bond) passes through — the dense parameters,
    the shared experts and its top-k experts in each MoE layer."""
    with torch.device("meta"):
        model = Potential(cfg)
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for p in model.expert_parameters())
    inactive = sum((len(layer.experts) - cfg.moe_top_k) * sum(p.numel() for p in next(iter(layer.experts.values())).parameters())
                   for layer in model.moe_layers)
    return {"total": total, "dense": total - expert, "expert": expert, "active_per_token": total - inactive,
            "moe_layers": len(model.moe_layers), "experts_per_layer": cfg.moe_experts, "top_k": cfg.moe_top_k}


@dataclass
class Prediction:
    energy_G: torch.Tensor   # eV
    forces_N3: torch.Tensor  # eV/Å
    stress_G6: torch.Tensor  # eV/Å³, Voigt xx yy zz yz xz xy, ASE sign; NaN for non-periodic graphs


VOIGT_INDEX = ((0, 1, 2, 1, 0, 0), (0, 1, 2, 2, 2, 1))


@dataclass
class StrainedGeometry:
    """Leaf tensors that forces and stress differentiate against, and the edge vectors built from them."""

    positions_N3: torch.Tensor
    strain_G33: torch.Tensor
    vectors_E3: torch.Tensor


def strained_geometry(batch: GraphBatch) -> StrainedGeometry:
    """Edge vectors after a zero-valued symmetric strain ε deforms positions and cell, so ∂E/∂ε is the virial.

    A strain deforms every vector of the structure alike, so it is applied to the edge vectors
    v·(1 + ε) rather than to positions and cell: the same function, but ∂E/∂ε = Σ_E v ⊗ ∂E/∂v
    sums edge-sized terms instead of cancelling position-sized ones (float32 stress of a cell far
    from the origin)."""
    positions_N3 = batch.positions_N3.detach().requires_grad_(True)
    strain_G33 = torch.zeros_like(batch.cell_G33, requires_grad=True)
    symmetric_G33 = 0.5 * (strain_G33 + strain_G33.transpose(1, 2))
    src_E, dst_E = batch.edge_index_2E
    graph_E = batch.graph_N[src_E]
    vectors_E3 = positions_N3[dst_E] - positions_N3[src_E] + torch.einsum("ex,exy->ey", batch.shifts_E3,
                                                                          batch.cell_G33[graph_E])
    return StrainedGeometry(positions_N3, strain_G33,
                            vectors_E3 + torch.einsum("ex,exy->ey", vectors_E3, symmetric_G33[graph_E]))


def local_routing(model: Potential, batch: GraphBatch) -> Routing:
    """Routing when one process holds every expert and the whole batch (inference, serial runs)."""
    return model.plan_routing(TokenCounts.single(batch.route_counts_2C))


def energy(model: Potential, batch: GraphBatch, geometry: StrainedGeometry, routing: Routing | None = None,
           plan: Recompute | None = None, readout_atoms: torch.Tensor | None = None,
           halo: Halo | None = None) -> torch.Tensor:
    if routing is None and model.moe_layers:
        routing = local_routing(model, batch)
    return model(batch.species_N, geometry.vectors_E3, batch.edge_index_2E, batch.triplet_index_2T,
                 batch.graph_N, batch.n_graphs, batch.head_G, routing, plan, readout_atoms, halo)


def forces_and_stress(energy_G: torch.Tensor, geometry: StrainedGeometry, batch: GraphBatch,
                      training: bool) -> Prediction:
    """Forces = −∂E/∂r and stress = (1/V)·∂E/∂ε from one autograd.grad call.

    create_graph only in training: the loss on forces and stress then differentiates through this
    gradient (double backward). allow_unused=False: a geometry the energy ignores is a bug.
    """
    grad_pos_N3, grad_strain_G33 = torch.autograd.grad(
        energy_G.sum(), (geometry.positions_N3, geometry.strain_G33), create_graph=training)
    return prediction(energy_G, grad_pos_N3, grad_strain_G33, batch)


def prediction(energy_G: torch.Tensor, grad_pos_N3: torch.Tensor, grad_strain_G33: torch.Tensor,
               batch: GraphBatch) -> Prediction:
    """Energy, forces and stress from the energy and its gradients (differentiable in all three)."""
    volume_G = torch.linalg.det(batch.cell_G33).abs()
    stress_G33 = grad_strain_G33 / volume_G.where(batch.periodic_G, torch.ones_like(volume_G))[:, None, None]
    stress_G6 = stress_G33[:, VOIGT_INDEX[0], VOIGT_INDEX[1]]
    stress_G6 = stress_G6.where(batch.periodic_G[:, None], torch.full_like(stress_G6, float("nan")))
    return Prediction(energy_G=energy_G, forces_N3=-grad_pos_N3, stress_G6=stress_G6)


# Inference on a line graph this large (triplets × width × blocks) sweeps the lines in chunks: the
# fused attention stores its inputs only, and the triplets' geometry features are recomputed in units
# of INFERENCE_GEOMETRY_LINES triplets instead of stored; smaller ones take the plain path, the fastest.
# The line attentions' sums are stored (bonds=False): without a second backward, recomputing them with
# the bond update saves nothing. A dense Cu cell, 8,000 atoms, float64, the light block, width 8
# (2026-12-06): 6.2 s and 2.9 GiB peak RSS, against 6.4 s and 4.2 GiB with the geometry stored and
# the sums recomputed.
LEAN_INFERENCE_ABOVE = 2**23
INFERENCE_CHUNK_LINES = 4096
INFERENCE_GEOMETRY_LINES = 2**16


def inference_plan(model: Potential, batch: GraphBatch) -> Recompute | None:
    """The path an inference of `batch` takes: a function of the batch alone, so a structure gets the
    same numbers whichever ranks or companions it is predicted with."""
    if model.cfg.block == "matris":  # it has no fused path
        return None
    line_channels = batch.triplet_index_2T.shape[1] * model.cfg.line_channels_per_triplet
    # MoE: the fused path always, whatever the batch's size, since it re-issues the expert all-to-alls
    # while it recomputes and every rank of an EP group must issue the same ones (as in training)
    lean_above = 0 if model.moe_layers else LEAN_INFERENCE_ABOVE
    return Recompute.from_run(INFERENCE_CHUNK_LINES, False, lean_above, line_channels, INFERENCE_GEOMETRY_LINES)


def energy_forces_stress(model: Potential, batch: GraphBatch, training: bool,
                         routing: Routing | None = None) -> Prediction:
    """Training (create_graph): the plain path, the reference the tests compare with; inference:
    inference_plan's."""
    geometry = strained_geometry(batch)
    plan = None if training else inference_plan(model, batch)
    return forces_and_stress(energy(model, batch, geometry, routing, plan), geometry, batch, training)
