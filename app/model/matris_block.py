"""The MatRIS-style interaction block (`model.block = "matris"`), beside exaforce's light block.

MatRIS (matris 1.0.0, `model/interaction_block.py`) carries a feature on every triplet of the
line graph and updates it in every block; its attention builds each line's message with a gated
MLP of [the line's own feature, its target, its source] — an MLP on T rows, the work the light
block avoids — scores each channel from the line's feature, aggregates into both endpoints with a
per-channel softmax, and updates the entity with a gated MLP of [itself, both aggregates]; the line
keeps the message as its residual update. Refinement sub-layers follow: the bond feature through a
gated MLP gated by a learnable envelope of the radial basis, the atom feature through a gated MLP.

Kept from exaforce, so the energy stays smooth where MatRIS's is not: the softmax is the weighted
one with the +1 in the denominator (a line at its cutoff weighs 0 and leaves without a jump,
`blocks.smooth_attention`) and its aggregate is occupancy-scaled RMS-normed
(`SeparableAttention.normed_message`); the refinement's envelope is the radial basis's, which
vanishes at the cutoff. Plain autograd only (no fused or recomputed path), dense MLPs only.

Shape legend: N atoms, E bonds, T triplets, D channels, R radial basis functions.
"""

from __future__ import annotations

import torch
from torch import nn

from exaforce.config import ModelConfig
from exaforce.model.blocks import SeparableAttention, segment_softmax_sums
from exaforce.model.fused_attention import SegmentSums, segment_max
from exaforce.model.layers import GatedMLP, RMSNorm


class MessageAttention(nn.Module):
    """MatRIS's attention on one graph: lines (bonds of the atom graph, or triplets of the line
    graph) between entities (atoms, or bonds). Returns the updated entity and line features."""

    def __init__(self, width: int, hidden: int, update_lines: bool = True):
        super().__init__()
        self.message = GatedMLP(3 * width, hidden, width)       # [line, target, source] → message
        self.score = nn.Linear(width, 2 * width, bias=False)     # per channel: into the source, into the target
        self.norm = RMSNorm(2 * width)
        self.update = GatedMLP(3 * width, hidden, width)        # [entity, into-source, into-target] → update
        self.entity_scale = nn.Parameter(torch.ones(width))
        # The last block's line features reach no energy: no parameter that would never get a gradient.
        self.line_scale = nn.Parameter(torch.ones(width)) if update_lines else None

    def forward(self, entity_SD: torch.Tensor, line_XD: torch.Tensor, weight_X: torch.Tensor,
                index_2X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        src_X, dst_X = index_2X
        message_XD = self.message(torch.cat([line_XD, entity_SD[dst_X], entity_SD[src_X]], -1))
        score0_XD, score1_XD = self.score(line_XD).chunk(2, -1)
        # segment_max fills its last argument in place: one buffer per direction
        max0_SD = segment_max(score0_XD.detach(), weight_X.detach(), src_X, entity_SD.new_zeros(entity_SD.shape))
        max1_SD = segment_max(score1_XD.detach(), weight_X.detach(), dst_X, entity_SD.new_zeros(entity_SD.shape))
        sums = SegmentSums((*segment_softmax_sums(score0_XD, message_XD, weight_X, src_X, max0_SD),
                            *segment_softmax_sums(score1_XD, message_XD, weight_X, dst_X, max1_SD)), (max0_SD, max1_SD))
        aggregate_S2D = SeparableAttention.normed_message(sums, self.norm)
        entity_SD = entity_SD + self.entity_scale * self.update(torch.cat([entity_SD, aggregate_S2D], -1))
        return entity_SD, None if self.line_scale is None else line_XD + self.line_scale * message_XD


class MatrisBlock(nn.Module):
    """Line graph (triplets → bonds), atom graph (bonds → atoms), then the refinement of both."""

    def __init__(self, cfg: ModelConfig, last: bool = False):
        super().__init__()
        d = cfg.width
        self.line_graph = MessageAttention(d, cfg.edge_mlp_ratio * d, update_lines=not last)
        self.atom_graph = MessageAttention(d, cfg.node_mlp_ratio * d, update_lines=not last)
        # The last block refines atoms only: its bond and triplet features reach no energy.
        self.bond_envelope = None if last else nn.Linear(cfg.radial_basis, d, bias=False)  # MatRIS's learnable envelope
        self.bond_refine = None if last else GatedMLP(d, cfg.edge_mlp_ratio * d, d)
        self.atom_norm = RMSNorm(d)
        self.atom_refine = GatedMLP(d, cfg.node_mlp_ratio * d, d)

    def forward(self, node_ND: torch.Tensor, edge_ED: torch.Tensor, triplet_TD: torch.Tensor,
                edge_index_2E: torch.Tensor, edge_weight_E: torch.Tensor, triplet_index_2T: torch.Tensor,
                triplet_weight_T: torch.Tensor, radial_ER: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """New atom, bond and triplet features; the last block returns None for the bonds and triplets
        (they reach no energy)."""
        edge_ED, triplet_TD = self.line_graph(edge_ED, triplet_TD, triplet_weight_T, triplet_index_2T)
        node_ND, edge_ED = self.atom_graph(node_ND, edge_ED, edge_weight_E, edge_index_2E)
        if self.bond_refine is not None:
            edge_ED = edge_ED + self.bond_envelope(radial_ER) * self.bond_refine(edge_ED)
        node_ND = node_ND + self.atom_refine(self.atom_norm(node_ND))
        return node_ND, edge_ED, triplet_TD
