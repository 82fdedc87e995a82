"""Small building blocks of the backbone: norms, gated MLPs, separable attention, the interaction block.

Shape legend: N atoms, E edges, T triplets, D channels, F input features.
"""

from __future__ import annotations

import torch
from torch import nn

from exaforce.config import ModelConfig
from exaforce.model.layers import GatedMLP, RMSNorm
from exaforce.model.moe import MoEMLP
from exaforce.model.routing import ATOMS, BONDS, Routing


def smooth_attention_sum(score_XD: torch.Tensor, value_XD: torch.Tensor, weight_X: torch.Tensor,
                         segment_X: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Σ_x α_x·v_x per segment with a per-channel softmax α weighted by a cutoff envelope.

    α_x = w_x·exp(s_x) / (1 + Σ_y w_y·exp(s_y)). The weight w enters numerator and denominator, and
    the 1 keeps the value continuous when the last item of a segment leaves: an item at its
    cutoff (w = 0) contributes nothing, so the energy stays smooth as neighbours come and go.
    The per-segment max is subtracted for stability (an exact identity), and the denominator is
    applied per segment after the sum, so α itself is never materialised per line.
    """
    d = score_XD.shape[1]
    index_XD = segment_X.unsqueeze(1).expand(-1, d)
    max_SD = torch.full((n_segments, d), -torch.inf, dtype=score_XD.dtype, device=score_XD.device)
    max_SD = max_SD.scatter_reduce(0, index_XD, score_XD.detach(), "amax", include_self=True)
    max_SD = max_SD.clamp_min(0.0)  # ≥ 0 (and finite for empty segments) so exp(−max) never overflows
    num_XD = weight_X.unsqueeze(1) * torch.exp(score_XD - max_SD.index_select(0, segment_X))
    den_SD = torch.exp(-max_SD).index_add(0, segment_X, num_XD)
    return torch.zeros_like(den_SD).index_add(0, segment_X, num_XD * value_XD) / den_SD


class SeparableAttention(nn.Module):
    """Messages on the lines of a graph (triplets of the line graph, or bonds of the atom graph),
    aggregated into both endpoints with a per-channel softmax over the lines that share a source
    and, separately, over those that share a target. No query·key products.

    Separable means factorised: every dense matmul runs on entities (S rows) or on the small line
    input (A or D columns), and a line only gathers, adds and multiplies D-vectors. A line costs
    O(D) instead of the O(D²) of an MLP on concatenated features — the line graph has several
    times more rows than the atom graph, and the double backward triples that work.
    """

    def __init__(self, width: int, line_dim: int):
        super().__init__()
        self.width = width
        # Entity projections, laid out so that each line needs one gather per endpoint:
        #   at the source: [score_0, gate_0 (self) | score_1, gate_1 (other) | value_1]
        #   at the target: [score_0, gate_0 (other) | score_1, gate_1 (self) | value_0]
        # Direction 0 aggregates into the source, direction 1 into the target.
        self.entity_proj = nn.Linear(width, 10 * width)
        self.line_proj = nn.Linear(line_dim, 4 * width, bias=False)  # score/gate terms of the line itself

    def forward(self, entity_SD: torch.Tensor, line_XF: torch.Tensor, weight_X: torch.Tensor,
                index_2X: torch.Tensor) -> torch.Tensor:
        n_segments, d = entity_SD.shape[0], self.width
        at_src_S5D, at_dst_S5D = self.entity_proj(entity_SD).split(5 * d, dim=-1)
        src_X, dst_X = index_2X
        from_src_X5D = at_src_S5D.index_select(0, src_X)
        from_dst_X5D = at_dst_S5D.index_select(0, dst_X)
        pre_X4D = from_src_X5D[:, :4 * d] + from_dst_X5D[:, :4 * d] + self.line_proj(line_XF)
        score0_XD, gate0_XD, score1_XD, gate1_XD = pre_X4D.chunk(4, dim=-1)
        value0_XD = nn.functional.silu(gate0_XD) * from_dst_X5D[:, 4 * d:]
        value1_XD = nn.functional.silu(gate1_XD) * from_src_X5D[:, 4 * d:]
        # Both directions in one pass: segments 0..S−1 are sources, S..2S−1 are targets.
        out_2SD = smooth_attention_sum(torch.cat([score0_XD, score1_XD]), torch.cat([value0_XD, value1_XD]),
                                       torch.cat([weight_X, weight_X]), torch.cat([src_X, dst_X + n_segments]),
                                       2 * n_segments)
        return torch.cat([out_2SD[:n_segments], out_2SD[n_segments:]], dim=-1)  # (S, 2·D)


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
    aggregate with a learnable per-channel residual scale."""

    def __init__(self, cfg: ModelConfig, ep_rank: int = 0, ep_size: int = 1):
        super().__init__()
        d = cfg.width
        self.line_attention = SeparableAttention(d, cfg.angle_basis)
        self.edge_norm = RMSNorm(2 * d)
        self.edge_update = UpdateMLP(cfg, 3 * d, cfg.edge_mlp_ratio * d, d, BONDS, ep_rank, ep_size)
        self.edge_scale = nn.Parameter(torch.ones(d))
        self.atom_attention = SeparableAttention(d, d)
        self.node_norm = RMSNorm(2 * d)
        self.node_update = UpdateMLP(cfg, 3 * d, cfg.node_mlp_ratio * d, d, ATOMS, ep_rank, ep_size)
        self.node_scale = nn.Parameter(torch.ones(d))

    def forward(self, node_ND: torch.Tensor, edge_ED: torch.Tensor, class_N: torch.Tensor,
                edge_index_2E: torch.Tensor, edge_weight_E: torch.Tensor, triplet_index_2T: torch.Tensor,
                angle_TA: torch.Tensor, triplet_weight_T: torch.Tensor,
                routing: Routing | None) -> tuple[torch.Tensor, torch.Tensor]:
        # Line graph: bonds a and b sharing a centre atom exchange messages shaped by their angle.
        bond_msg_E2D = self.line_attention(edge_ED, angle_TA, triplet_weight_T, triplet_index_2T)
        edge_in_E3D = torch.cat([edge_ED, self.edge_norm(bond_msg_E2D)], -1)
        edge_ED = edge_ED + self.edge_scale * self.edge_update(edge_in_E3D, class_N[edge_index_2E[0]], routing)

        # Atom graph: each atom gathers from the bonds it starts and the bonds it ends.
        atom_msg_N2D = self.atom_attention(node_ND, edge_ED, edge_weight_E, edge_index_2E)
        node_in_N3D = torch.cat([node_ND, self.node_norm(atom_msg_N2D)], -1)
        node_ND = node_ND + self.node_scale * self.node_update(node_in_N3D, class_N, routing)
        return node_ND, edge_ED
