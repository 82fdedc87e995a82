"""Element-routed Mixture-of-Experts MLP: router, dispatch (local or expert-parallel), experts.

Routing depends only on a token's routing class, head·Z + element (never on positions), so the
potential energy surface is as smooth as the dense backbone's and forces stay conservative. Every
token goes to its class's top-k experts (dropless) plus one always-on shared expert.

Three parts, as torchtitan's MoE: the router (class → top-k experts and weights), the dispatcher
(moves (token, slot) rows to the experts and back), the experts. This module holds no collective:
a layer starts with a `LocalDispatcher` (every expert in this process: the serial reference), and
expert parallelism (exaforce.parallel.expert_parallel) hands it an all-to-all dispatcher with the
same `dispatch()`/`combine()`. Then the X experts of a layer are split over the ep ranks of an EP
group, X/ep consecutive experts per rank, and every rank builds the same graph of operations
every step (empty expert chunks included), so every backward issues its collectives in the same
order on every rank.

Shapes: T tokens (atoms or bonds), P = T·K (token, slot) pairs, R rows this rank's experts run, F input features, H hidden,
D output, X experts, K top-k, Z elements, C routing classes (heads × elements).
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np
import torch
from torch import nn

from exaforce.model.layers import GatedMLP
from exaforce.model.offload import ExpertBuffer
from exaforce.model.routing import (DispatchClock, LayerRoute, Placement, contiguous_placement, held_experts,
                                   single_owner_placement)


class ElementRouter(nn.Module):
    """Router probabilities for each routing class c = head·Z + element, from learnable element and
    dataset/fidelity embeddings (never positions)."""

    def __init__(self, n_elements: int, n_experts: int, top_k: int, n_heads: int = 1, dim: int = 16):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"model.moe_top_k = {top_k}: must be between 1 and model.moe_experts = {n_experts}")
        self.top_k = top_k
        self.element_embedding = nn.Embedding(n_elements, dim)
        self.head_embedding = nn.Embedding(n_heads, dim) if n_heads > 1 else None
        self.logits = nn.Linear(dim, n_experts, bias=False)

    def probabilities(self) -> torch.Tensor:
        """C×X softmax over experts for every routing class (C = heads × elements)."""
        embedding_CD = self.element_embedding.weight
        if self.head_embedding is not None:
            embedding_CD = (self.head_embedding.weight[:, None, :] + embedding_CD[None]).reshape(-1, embedding_CD.shape[1])
        return torch.softmax(self.logits(embedding_CD), dim=-1)

    def top_k_table(self) -> torch.Tensor:
        """C×K expert indices (not differentiable: the choice of experts, not their weights)."""
        return self.probabilities().detach().topk(self.top_k, dim=-1).indices


def load_balancing_loss(probs_CX: torch.Tensor, expert_CK: torch.Tensor, tokens_C: torch.Tensor) -> torch.Tensor:
    """X·Σ_e f_e·P_e (Switch Transformer, Fedus et al. 2021, eq. 4) over the step's tokens: f_e the
    share of routed slots on expert e, P_e the mean router probability. Depends on the tokens only
    through their element counts, so with world counts it is the same on every rank."""
    share_C = tokens_C.to(probs_CX.dtype) / tokens_C.sum().clamp_min(1).to(probs_CX.dtype)
    routed_CX = torch.zeros_like(probs_CX).scatter(1, expert_CK, 1.0 / expert_CK.shape[1])
    return probs_CX.shape[1] * ((share_C @ routed_CX) * (share_C @ probs_CX)).sum()


class Dispatcher(Protocol):
    """Moves a layer's (token, slot) rows, sorted by expert, to the rows its local experts run on
    (grouped by local expert, `route.expert_rows` each), and the experts' outputs back."""

    def dispatch(self, x_PF: torch.Tensor, route: LayerRoute, clock: DispatchClock) -> torch.Tensor: ...

    def combine(self, y_RD: torch.Tensor, route: LayerRoute, clock: DispatchClock) -> torch.Tensor: ...


class LocalDispatcher:
    """Every expert is in this process: the rows already are in expert order, nothing moves."""

    def dispatch(self, x_PF: torch.Tensor, route: LayerRoute, clock: DispatchClock) -> torch.Tensor:
        return x_PF

    def combine(self, y_RD: torch.Tensor, route: LayerRoute, clock: DispatchClock) -> torch.Tensor:
        return y_RD


def _init_seed() -> int:
    """One draw from the global RNG per MoE layer: identical on every rank for any EP size."""
    return int(torch.randint(0, 2**62, (), device="cpu"))


class MoEMLP(nn.Module):
    """Σ_k w_k·expert_k(x) + shared(x), experts chosen per routing class, w their router
    probabilities (renormalised over the k when k > 1); holds this rank's experts only.

    The placement says which EP ranks hold each expert (default: X/ep consecutive experts per rank,
    one holder each; replicas: exaforce.model.routing.Placement); the same on every rank. Expert e is
    initialised from its own seed (layer seed + e), so a rank holding any set of experts starts with
    exactly the weights the single-rank model gives them.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, n_elements: int, n_experts: int, top_k: int,
                 token_kind: int, ep_rank: int = 0, ep_size: int = 1, n_heads: int = 1):
        super().__init__()
        if n_experts % ep_size:
            raise ValueError(f"model.moe_experts = {n_experts} is not divisible by parallel.ep = {ep_size}")
        self.router = ElementRouter(n_elements, n_experts, top_k, n_heads)
        self.token_kind = token_kind
        self.layer_index = -1  # position among the model's MoE layers, set by the Potential
        self.ep_rank = ep_rank
        self.dims = (in_dim, hidden, out_dim)
        self.seed = _init_seed()
        with torch.device("meta"):
            self.expert_numel = sum(p.numel() for p in GatedMLP(*self.dims).parameters())
        self.placement: Placement = contiguous_placement(n_experts, ep_size)
        self.experts = nn.ModuleDict({str(e): self._initial_expert(e) for e in self.local_experts()})  # keyed by
        self.shared = GatedMLP(in_dim, hidden, out_dim)                                              # global index
        self.dispatcher: Dispatcher = LocalDispatcher()  # replaced by exaforce.parallel for ep > 1
        self.offload: ExpertBuffer | None = None  # parallel.resident_experts: experts on the host (model.offload)

    def local_experts(self) -> list[int]:
        """The experts this rank holds (owned and replicas), in the order they run (ascending index)."""
        return held_experts(self.placement, self.ep_rank)

    def owned_experts(self) -> list[int]:
        """The experts this rank owns: their checkpoint copy and their share of the gradient norm."""
        return [e for e, holders in enumerate(self.placement) if holders[0] == self.ep_rank]

    def replicated(self) -> list[int]:
        """The experts held by more than one rank (their gradients are summed over the holders)."""
        return [e for e, holders in enumerate(self.placement) if len(holders) > 1]

    def _initial_expert(self, e: int) -> GatedMLP:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + e)
            return GatedMLP(*self.dims)

    def new_expert(self) -> GatedMLP:
        """An expert of this layer's shape, for weights that arrive from another rank."""
        with torch.random.fork_rng(devices=[]):
            return GatedMLP(*self.dims)

    def place_initial(self, placement: Placement | np.ndarray) -> None:
        """Another placement before training (a Placement, or the owner of each expert): this rank
        builds the experts it now holds from their seeds (moving trained experts is
        exaforce.parallel.expert_parallel's)."""
        self.placement = placement if isinstance(placement, tuple) else single_owner_placement(placement)
        like = next(self.shared.parameters())
        self.experts = nn.ModuleDict({str(e): self._initial_expert(e).to(like.device, like.dtype)
                                      for e in self.local_experts()})

    def _run_expert(self, e: int, expert: nn.Module, x_RF: torch.Tensor) -> torch.Tensor:
        return expert(x_RF) if self.offload is None else self.offload.run(e, expert, x_RF)

    def forward(self, x_TF: torch.Tensor, class_T: torch.Tensor, route: LayerRoute,
                clock: DispatchClock) -> torch.Tensor:
        """class_T: each token's routing class (head·Z + element)."""
        top_k = route.expert_CK.shape[1]
        expert_CK = torch.from_numpy(route.expert_CK).to(class_T.device)
        weight_CK = self.router.probabilities().gather(1, expert_CK)
        if top_k > 1:  # the chosen experts' weights renormalised to sum to 1 (Mixtral);
            weight_CK = weight_CK / weight_CK.sum(-1, keepdim=True)
        # with one expert that weight would be exactly 1 and the task loss would never reach the
        # router: its probability scales the output instead (Switch Transformer)
        # (token, slot) pairs sorted by (destination rank, expert): the all-to-all's send order.
        order_P = route.send_order(expert_CK[class_T].reshape(-1))
        token_P = order_P // top_k
        weight_P = weight_CK[class_T].reshape(-1).index_select(0, order_P)
        x_PF = x_TF.index_select(0, token_P)

        if self.offload is not None:  # the plan says which experts will run: their copies start now
            self.offload.prefetch([(int(e), expert) for (e, expert), rows in zip(self.experts.items(), route.expert_rows)
                                   if rows])
        rows_RF = self.dispatcher.dispatch(x_PF, route, clock)
        chunks = rows_RF.split(route.expert_rows)
        t0 = time.perf_counter()
        y_RD = torch.cat([self._run_expert(int(e), expert, chunk)
                          for (e, expert), chunk in zip(self.experts.items(), chunks)])
        clock.expert_seconds += time.perf_counter() - t0
        y_PD = self.dispatcher.combine(y_RD, route, clock)
        return self.shared(x_TF).index_add(0, token_P, y_PD * weight_P.unsqueeze(-1))
