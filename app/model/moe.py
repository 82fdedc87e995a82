"""Element-routed Mixture-of-Experts MLP: router, local dispatcher, experts.

Routing depends only on a token's element (never on positions), so the potential energy surface
is as smooth as the dense backbone's and forces stay conservative. Every token goes to its
element's top-k experts (dropless) plus one always-on shared expert.

Shapes: T tokens (atoms or bonds), F input features, H hidden, D output, X experts, K top-k,
Z elements. This module holds no collectives: the expert-parallel dispatcher (issue 4) will
exchange the same per-expert token groups with `exaforce.comm.alltoall.all_to_all`.
"""

from __future__ import annotations

import torch
from torch import nn

from exaforce.model.layers import GatedMLP


class ElementRouter(nn.Module):
    """Top-k experts and their weights for each element, from a learnable element embedding."""

    def __init__(self, n_elements: int, n_experts: int, top_k: int, dim: int = 16):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"model.moe_top_k = {top_k}: must be between 1 and model.moe_experts = {n_experts}")
        self.top_k = top_k
        self.element_embedding = nn.Embedding(n_elements, dim)
        self.logits = nn.Linear(dim, n_experts, bias=False)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(expert index Z×K, combine weight Z×K, router probabilities Z×X) for every element."""
        probs_ZX = torch.softmax(self.logits(self.element_embedding.weight), dim=-1)
        weight_ZK, expert_ZK = probs_ZX.topk(self.top_k, dim=-1)
        return expert_ZK, weight_ZK / weight_ZK.sum(-1, keepdim=True), probs_ZX


class MoEMLP(nn.Module):
    """Σ_k w_k·expert_k(x) + shared(x), experts chosen per element; `aux_loss` after each forward."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, n_elements: int, n_experts: int, top_k: int):
        super().__init__()
        self.router = ElementRouter(n_elements, n_experts, top_k)
        self.experts = nn.ModuleList(GatedMLP(in_dim, hidden, out_dim) for _ in range(n_experts))
        self.shared = GatedMLP(in_dim, hidden, out_dim)
        self.out_dim = out_dim

    def forward(self, x_TF: torch.Tensor, species_T: torch.Tensor) -> torch.Tensor:
        expert_ZK, weight_ZK, probs_ZX = self.router()
        expert_TK, weight_TK = expert_ZK[species_T], weight_ZK[species_T]
        out_TD = self.shared(x_TF)
        # Local dispatch: one contiguous token group per expert (the all-to-all's send order).
        for e, expert in enumerate(self.experts):
            token_J, slot_J = (expert_TK == e).nonzero(as_tuple=True)
            if token_J.numel():
                y_JD = expert(x_TF.index_select(0, token_J)) * weight_TK[token_J, slot_J].unsqueeze(-1)
                out_TD = out_TD.index_add(0, token_J, y_JD)
        # Load-balancing loss X·Σ_e f_e·P_e (Switch Transformer, Fedus et al. 2021, eq. 4), over tokens.
        n_experts = probs_ZX.shape[1]
        counts_Z = torch.bincount(species_T, minlength=probs_ZX.shape[0]).to(probs_ZX.dtype)
        share_Z = counts_Z / counts_Z.sum().clamp_min(1.0)
        routed_ZX = torch.zeros_like(probs_ZX).scatter(1, expert_ZK, 1.0 / expert_ZK.shape[1])
        self.aux_loss = n_experts * (share_Z @ routed_ZX * (share_Z @ probs_ZX)).sum()
        return out_TD
