"""A trained model as one exported program for compiled MD codes (the ground of a LAMMPS pair style
in C++): the energy of a domain's own atoms and its gradient with respect to every edge vector, for
graphs of any size, as a `torch.export` program (`exaforce model export --out F.pt2`).

Why edge gradients: an MD code with domain decomposition holds its own atoms and ghost atoms out to
the model's receptive field (`exaforce model info`). With g_e = ∂E_own/∂v_e for each edge e = (i → j),
v_e = r_j − r_i (periodic shift included), the force on atom k is Σ_{e: src=k} g_e − Σ_{e: dst=k} g_e,
ghosts' forces go back to their owners (LAMMPS' reverse communication, `newton on`), and the virial is
W_ab = Σ_e v_e,a g_e,b (stress = W/V): exactly the training code's forces and stress
(exaforce.model.potential.forces_and_stress differentiates the same energy through the same vectors).
E_own sums the energies of the atoms marked own_N, so every atom's energy is counted once over the
domains.

Why make_fx first: torch.export (torch 2.13) cannot trace `torch.autograd.grad` inside a forward (it
stops at "a fake tensor in the exported program's constants"); `make_fx` with symbolic shapes records
the forward and its backward as one graph of aten ops, which torch.export then exports with dynamic
atom, edge and triplet counts. Dense models only: an MoE model's routing plan is made on the host from
the batch's element counts, outside any graph.

The inputs, as exaforce.graph builds them: species_N (the model's element index: `model info`'s
elements, in order), vectors_E3, edge_index_2E (src, dst) of every ordered pair closer than the
cutoff, triplet_index_2T (a, b) of every ordered pair of distinct edges with the same source atom,
both shorter than the three-body cutoff, and own_N (bool).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from exaforce.config import ConfigError
from exaforce.model.potential import Potential

INPUTS = ("species_N", "vectors_E3", "edge_index_2E", "triplet_index_2T", "own_N")


class OwnEnergy(nn.Module):
    """(E_own, ∂E_own/∂vectors_E3) of one domain's graph, for one energy head."""

    def __init__(self, model: Potential, head: int):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, species_N: torch.Tensor, vectors_E3: torch.Tensor, edge_index_2E: torch.Tensor,
                triplet_index_2T: torch.Tensor, own_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vectors_E3 = vectors_E3.detach().requires_grad_(True)
        group_N = (~own_N).long()  # "graph" 0: the own atoms, 1: the ghosts (their energy is not ours)
        head_G = torch.full((2,), self.head, dtype=torch.long, device=species_N.device)
        with torch.enable_grad():
            energy = self.model(species_N, vectors_E3, edge_index_2E, triplet_index_2T, group_N, 2, head_G)[0]
            (grad_E3,) = torch.autograd.grad(energy, vectors_E3)
        return energy.detach(), grad_E3


def example_inputs(model: Potential, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """A graph to trace with: 8 atoms on a cube of side 0.4 × the three-body cutoff (every pair within
    both cutoffs: 56 edges, 336 triplets), the model's elements in turn, the last atom a ghost."""
    side = 0.4 * model.cfg.three_body_cutoff
    grid = torch.tensor([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], dtype=dtype) * side
    species_N = torch.arange(8) % len(model.cfg.elements)
    src, dst = zip(*[(i, j) for i in range(8) for j in range(8) if i != j])
    edge_index_2E = torch.tensor([src, dst])
    vectors_E3 = grid[edge_index_2E[1]] - grid[edge_index_2E[0]]
    triplets = [(a, b) for a in range(len(src)) for b in range(len(src)) if a != b and src[a] == src[b]]
    own_N = torch.ones(8, dtype=torch.bool)
    own_N[-1] = False
    return species_N, vectors_E3, edge_index_2E, torch.tensor(triplets).T.contiguous(), own_N


def export_program(model: Potential, head: int, dtype: torch.dtype) -> torch.export.ExportedProgram:
    """OwnEnergy of `model` as an ExportedProgram with dynamic atom, edge and triplet counts (the model
    is taken over: converted to `dtype`, eval mode, parameters frozen, in place)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    if model.moe_layers:
        raise ConfigError("model export to .pt2: MoE models cannot be exported yet (their routing plan is made on "
                          "the host from the batch's element counts, outside the graph)")
    module = OwnEnergy(model.to(dtype).eval().requires_grad_(False), head)
    example = example_inputs(model, dtype)
    traced = make_fx(module, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*example)
    atoms, edges, triplets = (torch.export.Dim(name, min=2) for name in ("atoms", "edges", "triplets"))
    shapes = ({0: atoms}, {0: edges}, {1: edges}, {1: triplets}, {0: atoms})
    return torch.export.export(traced, example, dynamic_shapes=shapes, strict=False)


def write_program(model: Potential, head: int, dtype: torch.dtype, description: dict, path: Path) -> Path:
    """The exported program and, inside the archive as `extra/exaforce.json`, the model's description
    (elements in species order, cutoffs, receptive field, head, dtype, inputs)."""
    from exaforce.io.atomic import write_file_atomically

    program = export_program(model, head, dtype)
    meta = {**description, "head": model.cfg.heads[head], "dtype": str(dtype).removeprefix("torch."),
            "inputs": list(INPUTS), "outputs": ["energy of the own atoms (eV)", "dE/d(edge vectors) (eV/Å)"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(path, lambda f: torch.export.save(program, f, extra_files={"exaforce.json": json.dumps(meta)}))
    return path
