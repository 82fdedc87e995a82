"""Small building blocks of the backbone: norms, gated MLPs, separable attention, the interaction block.

Shape legend: N atoms, E edges, T triplets, D channels, F input features.
"""

from __future__ import annotations

from functools import partial
from typing import Protocol

import torch
from torch import nn

from exaforce.config import ModelConfig
from exaforce.model.layers import GatedMLP, RMSNorm
from exaforce.model.moe import MoEMLP
from exaforce.model.fused_attention import Inputs, SegmentSums, clamped_scores, fused_segment_sums, segment_max
from exaforce.model.recompute import Recompute, recompute
from exaforce.model.routing import ATOMS, BONDS, Routing


def segment_softmax_sums(score_XD: torch.Tensor, value_XD: torch.Tensor, weight_X: torch.Tensor,
                         segment_X: torch.Tensor, max_SD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per segment, Σ_x w_x·exp(s_x − m)·v_x and Σ_x w_x·exp(s_x − m), with m from segment_max
    (a constant: subtracting it is an exact identity that keeps exp finite and the sums nonzero). Sums over
    any split of the lines add up, so the lines can be processed in chunks."""
    exp_XD = weight_X.unsqueeze(1) * torch.exp(clamped_scores(score_XD, max_SD.index_select(0, segment_X)))
    zeros_SD = torch.zeros_like(max_SD)
    return zeros_SD.index_add(0, segment_X, exp_XD * value_XD), zeros_SD.index_add(0, segment_X, exp_XD)


def smooth_attention(num_SD: torch.Tensor, den_SD: torch.Tensor, max_SD: torch.Tensor) -> torch.Tensor:
    """Σ_x α_x·v_x with α_x = w_x·exp(s_x) / (1 + Σ_y w_y·exp(s_y)), from the sums above.

    The weight w enters numerator and denominator, and the 1 keeps the value continuous when the
    last item of a segment leaves: an item at its cutoff (w = 0) contributes nothing, so the energy
    stays smooth as neighbours come and go. The denominator is applied per segment after the sum,
    so α itself is never materialised per line."""
    return num_SD / (torch.exp(-max_SD) + den_SD)


class SeparableAttention(nn.Module):
    """Messages on the lines of a graph (triplets of the line graph, or bonds of the atom graph),
    aggregated into both endpoints with a per-channel softmax over the lines that share a source
    and, separately, over those that share a target. No query·key products.

    Separable means factorised: every dense matmul runs on entities (S rows) or on the small line
    input (A or D columns), and a line only gathers, adds and multiplies D-vectors. A line costs
    O(D) instead of the O(D²) of an MLP on concatenated features — the line graph has several
    times more rows than the atom graph, and the double backward triples that work.

    plan = None is the plain path: autograd through every per-line op (the reference). With a plan
    the attention is one op with hand-written first and second derivatives
    (exaforce.model.fused_attention) that sweeps the lines in chunks of plan.lines and stores no
    per-line tensor.
    """

    def __init__(self, entity_dim: int, line_dim: int, width: int | None = None):
        """width: the channels each line carries (default entity_dim); fewer than the entities'
        (model.line_width) makes every per-line op that much cheaper."""
        super().__init__()
        width = width or entity_dim
        self.width = width
        # Entity projections, laid out so that each line needs one gather per endpoint:
        #   at the source: [score_0, gate_0 (self) | score_1, gate_1 (other) | value_1]
        #   at the target: [score_0, gate_0 (other) | score_1, gate_1 (self) | value_0]
        # Direction 0 aggregates into the source, direction 1 into the target.
        self.entity_proj = nn.Linear(entity_dim, 10 * width)
        self.line_proj = nn.Linear(line_dim, 4 * width, bias=False)  # score/gate terms of the line itself

    def forward(self, entity_SD: torch.Tensor, line_XF: torch.Tensor, weight_X: torch.Tensor,
                index_2X: torch.Tensor, plan: Recompute | None = None) -> torch.Tensor:
        """The message into each entity, (S, 2·D): direction 0 (into the source), then 1."""
        return self.message(self.segment_sums(entity_SD, line_XF, weight_X, index_2X, plan))

    @staticmethod
    def message(sums: SegmentSums) -> torch.Tensor:
        num0_SD, den0_SD, num1_SD, den1_SD = sums.sums
        max0_SD, max1_SD = sums.maxima
        return torch.cat([smooth_attention(num0_SD, den0_SD, max0_SD), smooth_attention(num1_SD, den1_SD, max1_SD)], -1)

    @staticmethod
    def normed_message(sums: SegmentSums, norm: RMSNorm) -> torch.Tensor:
        """ρ ⊙ norm(message), ρ = Σ_x α_x ∈ [0, 1) the segment's occupancy, per channel and direction.

        Why ρ: the norm alone rescales a lone line's message α·v to size ≈ 1 whatever α, undoing the
        envelope (its energy change then packs into the last fraction of an Å before the cutoff).
        ρ·norm(α·v) = α·v/|v| decays with the weight, while a full segment (ρ ≈ 1) is normed as before."""
        _, den0_SD, _, den1_SD = sums.sums
        max0_SD, max1_SD = sums.maxima
        occupancy_S2D = torch.cat([den0_SD / (torch.exp(-max0_SD) + den0_SD),
                                   den1_SD / (torch.exp(-max1_SD) + den1_SD)], -1)
        return occupancy_S2D * norm(SeparableAttention.message(sums))

    def segment_sums(self, entity_SD: torch.Tensor, line_XF: torch.Tensor, weight_X: torch.Tensor,
                     index_2X: torch.Tensor, plan: Recompute | None = None, in_unit: bool = False) -> SegmentSums:
        """in_unit: called inside a recomputed unit (its passes share work: fused_segment_sums)."""
        if plan is not None:
            return fused_segment_sums(Inputs(entity_SD, self.entity_proj.weight, self.entity_proj.bias, line_XF,
                                             self.line_proj.weight, weight_X, index_2X), plan.lines, plan.scratch,
                                      in_unit, plan.release_freed_memory)
        # Plain: one pass over the lines, maxima from its own (detached) scores.
        n_segments = entity_SD.shape[0]
        src_X, dst_X = index_2X
        score0_XD, value0_XD, score1_XD, value1_XD = self._lines(self._parts(entity_SD), line_XF, src_X, dst_X)
        max0_SD = segment_max(score0_XD.detach(), weight_X.detach(), src_X, score0_XD.new_zeros(n_segments, self.width))
        max1_SD = segment_max(score1_XD.detach(), weight_X.detach(), dst_X, score1_XD.new_zeros(n_segments, self.width))
        return SegmentSums((*segment_softmax_sums(score0_XD, value0_XD, weight_X, src_X, max0_SD),
                            *segment_softmax_sums(score1_XD, value1_XD, weight_X, dst_X, max1_SD)), (max0_SD, max1_SD))

    # Entity pieces (see __init__): at the source 0 score_0, 1 gate_0, 2 score_1, 3 gate_1, 4 value_1;
    # at the target 5 score_0, 6 gate_0, 7 score_1, 8 gate_1, 9 value_0. Line terms: score_0, gate_0, score_1, gate_1.

    def _parts(self, entity_SD: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Ten S×D pieces, gathered one by one: the backward of a gather is then an S-sized add, and
        nothing per line is split, sliced or stacked (whose backward allocates line-sized tensors)."""
        return self.entity_proj(entity_SD).unflatten(-1, (10, self.width)).unbind(1)

    def _line_term(self, line_XF: torch.Tensor, k: int) -> torch.Tensor:
        return nn.functional.linear(line_XF, self.line_proj.weight.unflatten(0, (4, self.width))[k])

    def _scores(self, parts: tuple[torch.Tensor, ...], line_XF: torch.Tensor, src_X: torch.Tensor,
                dst_X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (parts[0].index_select(0, src_X) + parts[5].index_select(0, dst_X) + self._line_term(line_XF, 0),
                parts[2].index_select(0, src_X) + parts[7].index_select(0, dst_X) + self._line_term(line_XF, 2))

    def _lines(self, parts: tuple[torch.Tensor, ...], line_XF: torch.Tensor, src_X: torch.Tensor,
               dst_X: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Score and value of each line in direction 0 (into its source) and 1 (into its target)."""
        score0_XD, score1_XD = self._scores(parts, line_XF, src_X, dst_X)
        gate0_XD = parts[1].index_select(0, src_X) + parts[6].index_select(0, dst_X) + self._line_term(line_XF, 1)
        gate1_XD = parts[3].index_select(0, src_X) + parts[8].index_select(0, dst_X) + self._line_term(line_XF, 3)
        value0_XD = nn.functional.silu(gate0_XD) * parts[9].index_select(0, dst_X)
        value1_XD = nn.functional.silu(gate1_XD) * parts[4].index_select(0, src_X)
        return score0_XD, value0_XD, score1_XD, value1_XD


class Halo(Protocol):
    """Graph parallelism with a per-block halo exchange (exaforce.parallel.graph_parallel): replaces
    the rows of the halo atoms or halo bonds by their owners' values (differentiable to any order).
    The model only calls it; the collective belongs to the GP group."""

    def atoms(self, node_ND: torch.Tensor) -> torch.Tensor: ...

    def bonds(self, edge_ED: torch.Tensor) -> torch.Tensor: ...


class UpdateMLP(nn.Module):
    """A dense gated MLP, or an element-routed MoE MLP when model.moe_experts > 0 (two per block,
    as MatRIS-MoE: bond/message construction and atom update); one call signature for both."""

    def __init__(self, cfg: ModelConfig, in_dim: int, hidden: int, out_dim: int, token_kind: int,
                 ep_rank: int, ep_size: int):
        super().__init__()
        if cfg.moe_experts:
            self.mlp: nn.Module = MoEMLP(in_dim, hidden, out_dim, len(cfg.elements), cfg.moe_experts,
                                         cfg.moe_top_k, token_kind, ep_rank, ep_size, len(cfg.heads))
        else:
            self.mlp = GatedMLP(in_dim, hidden, out_dim)

    def forward(self, x_XF: torch.Tensor, class_X: torch.Tensor, routing: Routing | None) -> torch.Tensor:
        if isinstance(self.mlp, MoEMLP):
            return self.mlp(x_XF, class_X, routing.layers[self.mlp.layer_index], routing.clock)
        return self.mlp(x_XF)


class InteractionBlock(nn.Module):
    """Line-graph attention updates bonds from bond pairs (three-body, angle-aware), then
    atom-graph attention updates atoms from bonds; each update is a gated MLP on an RMS-normed
    aggregate (atoms: beside their neighbour density, model.density_sum) with a learnable
    per-channel residual scale."""

    def __init__(self, cfg: ModelConfig, ep_rank: int = 0, ep_size: int = 1):
        super().__init__()
        d, line_width = cfg.width, cfg.line_channels
        self.line_attention = SeparableAttention(d, cfg.angle_basis, line_width)
        self.edge_norm = RMSNorm(2 * line_width)
        self.edge_update = UpdateMLP(cfg, d + 2 * line_width, cfg.edge_mlp_ratio * d, d, BONDS, ep_rank, ep_size)
        self.edge_scale = nn.Parameter(torch.ones(d))
        self.atom_attention = SeparableAttention(d, d)
        self.node_norm = RMSNorm(2 * d)
        # density_sum: Σ_bonds w·bond, scaled per channel (1/16 at the start: dense metal cells hold about 16
        # bonds' worth of envelope weight within 5 Å), beside the attention's normalised message.
        self.density_scale = nn.Parameter(torch.full((d,), 1 / 16)) if cfg.density_sum else None
        self.node_update = UpdateMLP(cfg, (4 if cfg.density_sum else 3) * d, cfg.node_mlp_ratio * d, d, ATOMS,
                                     ep_rank, ep_size)
        self.node_scale = nn.Parameter(torch.ones(d))

    def forward(self, node_ND: torch.Tensor, edge_ED: torch.Tensor, class_N: torch.Tensor,
                edge_index_2E: torch.Tensor, edge_weight_E: torch.Tensor, triplet_index_2T: torch.Tensor,
                angle_TA: torch.Tensor, triplet_weight_T: torch.Tensor,
                routing: Routing | None, plan: Recompute | None = None,
                halo: Halo | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """halo: the bonds that end on this rank's atoms but start on another rank's take their
        owner's update before the atoms read them (the atoms' exchange is the caller's, between blocks).

        With a plan (training): both attentions are fused ops that store only their inputs, and
        the bond update (E rows through an MLP of 3·D inputs) is a recomputed unit — with the line
        attention inside it (plan.bonds: least memory) or fed the attention's stored sums (about
        10 E×D tensors per block more, about 1.2× faster on dense cells). The atom update (N rows, a few per
        cent of the block's memory) is stored."""
        # Line graph: bonds a and b sharing a centre atom exchange messages shaped by their angle.
        class_E = class_N[edge_index_2E[0]]
        edge_params = [*self.edge_norm.parameters(), *self.edge_update.parameters(), self.edge_scale]
        if plan is not None and plan.bonds:
            update = partial(self._attend_and_update_edges, class_E=class_E, triplet_index_2T=triplet_index_2T,
                             routing=routing, plan=plan)
            edge_ED, = recompute(update, (edge_ED, angle_TA, triplet_weight_T),
                                 [*self.line_attention.parameters(), *edge_params], plan.release_freed_memory)
        else:
            bond_sums = self.line_attention.segment_sums(edge_ED, angle_TA, triplet_weight_T, triplet_index_2T, plan)
            update = partial(self._update_edges, maxima=bond_sums.maxima, class_E=class_E, routing=routing)
            edge_ED, = update(edge_ED, *bond_sums.sums) if plan is None \
                else recompute(update, (edge_ED, *bond_sums.sums), edge_params, plan.release_freed_memory)
        if halo is not None:
            edge_ED = halo.bonds(edge_ED)

        # Atom graph: each atom gathers from the bonds it starts and the bonds it ends.
        atom_sums = self.atom_attention.segment_sums(node_ND, edge_ED, edge_weight_E, edge_index_2E, plan)
        node_in = [node_ND, SeparableAttention.normed_message(atom_sums, self.node_norm)]
        if self.density_scale is not None:
            weighted_ED = edge_weight_E.unsqueeze(1) * edge_ED
            node_in.append(self.density_scale * torch.zeros_like(node_ND).index_add(0, edge_index_2E[0], weighted_ED))
        node_ND = node_ND + self.node_scale * self.node_update(torch.cat(node_in, -1), class_N, routing)
        return node_ND, edge_ED

    def _attend_and_update_edges(self, edge_ED: torch.Tensor, angle_TA: torch.Tensor, triplet_weight_T: torch.Tensor,
                                 *, class_E: torch.Tensor, triplet_index_2T: torch.Tensor, routing: Routing | None,
                                 plan: Recompute) -> tuple[torch.Tensor]:
        sums = self.line_attention.segment_sums(edge_ED, angle_TA, triplet_weight_T, triplet_index_2T, plan,
                                                in_unit=True)
        return self._update_edges(edge_ED, *sums.sums, maxima=sums.maxima, class_E=class_E, routing=routing)

    def _update_edges(self, edge_ED: torch.Tensor, *sums: torch.Tensor, maxima: tuple[torch.Tensor, torch.Tensor],
                      class_E: torch.Tensor, routing: Routing | None) -> tuple[torch.Tensor]:
        bond_msg_E2D = SeparableAttention.normed_message(SegmentSums(sums, maxima), self.edge_norm)
        edge_in_E3D = torch.cat([edge_ED, bond_msg_E2D], -1)
        return (edge_ED + self.edge_scale * self.edge_update(edge_in_E3D, class_E, routing),)
