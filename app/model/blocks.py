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
        # Per entity and direction: score_self, gate_self, score_other, gate_other, value_other.
        self.entity_proj = nn.Linear(width, 10 * width)
        # Per line and direction: score and gate contributions of the line's own features.
        self.line_proj = nn.Linear(line_dim, 4 * width, bias=False)

    def forward(self, entity_SD: torch.Tensor, line_XF: torch.Tensor, weight_X: torch.Tensor,
                index_2X: torch.Tensor) -> torch.Tensor:
        n_segments, d = entity_SD.shape[0], self.width
        proj_S10D = self.entity_proj(entity_SD).view(n_segments, 10, d)
        line_X4D = self.line_proj(line_XF).view(-1, 4, d)
        src_X, dst_X = index_2X
        out = []
        # Direction 0 aggregates into the source over its lines; direction 1 into the target.
        for k, (seg_X, other_X) in enumerate(((src_X, dst_X), (dst_X, src_X))):
            p_SD = proj_S10D[:, 5 * k: 5 * k + 5]
            score_XD = p_SD[seg_X, 0] + p_SD[other_X, 2] + line_X4D[:, 2 * k]
            gate_XD = p_SD[seg_X, 1] + p_SD[other_X, 3] + line_X4D[:, 2 * k + 1]
            value_XD = nn.functional.silu(gate_XD) * p_SD[other_X, 4]
            alpha_XD = smooth_segment_softmax(score_XD, weight_X, seg_X, n_segments)
            zeros_SD = torch.zeros(n_segments, d, dtype=value_XD.dtype, device=value_XD.device)
            out.append(zeros_SD.index_add(0, seg_X, alpha_XD * value_XD))
        return torch.cat(out, dim=-1)  # (S, 2·D): [into source | into target]


class InteractionBlock(nn.Module):
    """Line-graph attention updates bonds from bond pairs (three-body, angle-aware), then
    atom-graph attention updates atoms from bonds; each update is a gated MLP on an RMS-normed
    aggregate with a learnable per-channel residual scale."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hidden = cfg.width, cfg.width * cfg.mlp_ratio
        self.line_attention = SeparableAttention(d, cfg.angle_basis)
        self.edge_norm = RMSNorm(2 * d)
        self.edge_update = GatedMLP(3 * d, hidden, d)
        self.edge_scale = nn.Parameter(torch.ones(d))
        self.atom_attention = SeparableAttention(d, d)
        self.node_norm = RMSNorm(2 * d)
        self.node_update = GatedMLP(3 * d, hidden, d)
        self.node_scale = nn.Parameter(torch.ones(d))

    def forward(self, node_ND: torch.Tensor, edge_ED: torch.Tensor, edge_index_2E: torch.Tensor,
                edge_weight_E: torch.Tensor, triplet_index_2T: torch.Tensor, angle_TA: torch.Tensor,
                triplet_weight_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Line graph: bonds a and b sharing a centre atom exchange messages shaped by their angle.
        bond_msg_E2D = self.line_attention(edge_ED, angle_TA, triplet_weight_T, triplet_index_2T)
        edge_ED = edge_ED + self.edge_scale * self.edge_update(torch.cat([edge_ED, self.edge_norm(bond_msg_E2D)], -1))

        # Atom graph: each atom gathers from the bonds it starts and the bonds it ends.
        atom_msg_N2D = self.atom_attention(node_ND, edge_ED, edge_weight_E, edge_index_2E)
        node_ND = node_ND + self.node_scale * self.node_update(torch.cat([node_ND, self.node_norm(atom_msg_N2D)], -1))
        return node_ND, edge_ED
