"""Small building blocks of the backbone: norms, gated MLPs, separable attention, the interaction block.

Shape legend: N atoms, E edges, T triplets, D channels, F input features.
"""

from __future__ import annotations

import torch
from torch import nn

from exaforce.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_XD: torch.Tensor) -> torch.Tensor:
        return x_XD * torch.rsqrt(x_XD.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class GatedMLP(nn.Module):
    """SiLU(x·W_g) ⊙ (x·W_u) → W_d: the gated update used for messages and node updates."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.gate = nn.Linear(in_dim, hidden)
        self.up = nn.Linear(in_dim, hidden)
        self.down = nn.Linear(hidden, out_dim)

    def forward(self, x_XF: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.silu(self.gate(x_XF)) * self.up(x_XF))


def smooth_segment_softmax(score_XD: torch.Tensor, weight_X: torch.Tensor, segment_X: torch.Tensor,
                           n_segments: int) -> torch.Tensor:
    """Per-channel softmax over the items of each segment, weighted by a cutoff envelope.

    α_x = w_x·exp(s_x) / (1 + Σ_y w_y·exp(s_y)). The weight w enters numerator and denominator, and
    the 1 keeps the value continuous when the last item of a segment leaves: an item at its
    cutoff (w = 0) contributes nothing, so the energy stays smooth as neighbours come and go.
    Computed with the per-segment max subtracted (an exact identity, for stability).
    """
    d = score_XD.shape[1]
    index_XD = segment_X.unsqueeze(1).expand(-1, d)
    max_SD = torch.full((n_segments, d), -torch.inf, dtype=score_XD.dtype, device=score_XD.device)
    max_SD = max_SD.scatter_reduce(0, index_XD, score_XD.detach(), "amax", include_self=True)
    max_SD = max_SD.clamp_min(0.0)  # ≥ 0 (and finite for empty segments) so exp(−max) never overflows
    num_XD = weight_X.unsqueeze(1) * torch.exp(score_XD - max_SD[segment_X])
    den_SD = torch.exp(-max_SD).index_add(0, segment_X, num_XD)
    return num_XD / den_SD[segment_X]


class SeparableAttention(nn.Module):
    """Aggregates the messages on the lines of a graph into both endpoints, with a per-channel
    softmax over the lines that share a source and, separately, over those that share a target.
    No query·key products: cost O(lines · D)."""

    def __init__(self, in_dim: int, width: int, hidden: int):
        super().__init__()
        self.width = width
        self.message = GatedMLP(in_dim, hidden, 4 * width)  # value, score for each direction

    def forward(self, inputs_XF: torch.Tensor, weight_X: torch.Tensor, index_2X: torch.Tensor,
                n_segments: int) -> torch.Tensor:
        value_src_XD, score_src_XD, value_dst_XD, score_dst_XD = self.message(inputs_XF).chunk(4, dim=-1)
        out = []
        for value_XD, score_XD, segment_X in ((value_src_XD, score_src_XD, index_2X[0]),
                                              (value_dst_XD, score_dst_XD, index_2X[1])):
            alpha_XD = smooth_segment_softmax(score_XD, weight_X, segment_X, n_segments)
            zeros_SD = torch.zeros(n_segments, self.width, dtype=value_XD.dtype, device=value_XD.device)
            out.append(zeros_SD.index_add(0, segment_X, alpha_XD * value_XD))
        return torch.cat(out, dim=-1)  # (n_segments, 2·D): [by source | by target]


class InteractionBlock(nn.Module):
    """Line-graph attention updates bonds from bond pairs (three-body), then atom-graph attention
    updates atoms from bonds; each update is a gated MLP on an RMS-normed aggregate with a
    learnable per-channel residual scale."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hidden = cfg.width, cfg.width * cfg.mlp_ratio
        self.angle_proj = nn.Linear(cfg.angle_basis, d, bias=False)
        self.line_attention = SeparableAttention(3 * d, d, hidden)
        self.edge_norm = RMSNorm(2 * d)
        self.edge_update = GatedMLP(2 * d, hidden, d)
        self.edge_scale = nn.Parameter(torch.ones(d))
        self.atom_attention = SeparableAttention(3 * d, d, hidden)
        self.node_norm = RMSNorm(2 * d)
        self.node_update = GatedMLP(3 * d, hidden, d)
        self.node_scale = nn.Parameter(torch.ones(d))

    def forward(self, node_ND: torch.Tensor, edge_ED: torch.Tensor, edge_index_2E: torch.Tensor,
                edge_weight_E: torch.Tensor, triplet_index_2T: torch.Tensor, angle_TA: torch.Tensor,
                triplet_weight_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        src_E, dst_E = edge_index_2E
        a_T, b_T = triplet_index_2T
        n_edges, n_atoms = edge_ED.shape[0], node_ND.shape[0]

        # Line graph: bonds a and b sharing a centre atom exchange messages (b → a and a → b).
        triplet_in_TF = torch.cat([edge_ED[a_T], edge_ED[b_T], self.angle_proj(angle_TA)], dim=-1)
        bond_msg_E2D = self.line_attention(triplet_in_TF, triplet_weight_T, triplet_index_2T, n_edges)
        edge_ED = edge_ED + self.edge_scale * self.edge_update(self.edge_norm(bond_msg_E2D))

        # Atom graph: each atom gathers from the bonds it starts and the bonds it ends.
        edge_in_EF = torch.cat([node_ND[src_E], node_ND[dst_E], edge_ED], dim=-1)
        atom_msg_N2D = self.atom_attention(edge_in_EF, edge_weight_E, edge_index_2E, n_atoms)
        update_ND = self.node_update(torch.cat([node_ND, self.node_norm(atom_msg_N2D)], dim=-1))
        node_ND = node_ND + self.node_scale * update_ND
        return node_ND, edge_ED
