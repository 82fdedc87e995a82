"""The official MatRIS (PyPI `matris` 1.0.0) as a benchmark reference: same width, depth, cutoffs, same step.

Why: our per-step time and memory only mean something next to the published model doing the same
work. This module builds MatRIS with random weights and hands back one full training step — forward,
forces and stress by autograd with create_graph=True, loss, backward, clip, AdamW — as a closure.

MatRIS facts this relies on (read from matris 1.0.0, `matris/model/model.py`, `readout.py`,
`processgraph.py`, `graph/converter.py`):
- `MatRIS(num_layers, node_feat_dim, edge_feat_dim, three_body_feat_dim, mlp_hidden_dims,
  pairwise_cutoff, three_body_cutoff, ...)`. Every interaction-block MLP hidden size is tied to the
  feature dims; `mlp_hidden_dims` only sizes the energy readout. Defaults: 6 layers, 128 wide
  (6,286,736 parameters); 10 layers at 128 is the published "MatRIS-10M" (10,379,664).
- `forward(graphs, task="efs", is_training=True)` returns energy per atom (`is_intensive=True`),
  forces (eV/Å) and stress (GPa, ASE sign, 3×3) from one `torch.autograd.grad(E.sum(), (positions,
  strain), create_graph=is_training)`. `is_training` — not `module.training` — switches create_graph on.
- Graphs (`RadiusGraph`) come from `model.graph_converter(pymatgen Structure)`: pymatgen's
  `get_neighbor_list` on CPU, then NumPy line-graph assembly. Always float32.

Shape legend: N atoms, G graphs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from ase import Atoms
from ase.stress import voigt_6_to_full_3x3_stress

from exaforce.config import LossConfig, OptimConfig
from exaforce.loss import EV_PER_A3_IN_GPA

try:
    from matris.graph import RadiusGraph
    from matris.model import MatRIS
    from pymatgen.io.ase import AseAtomsAdaptor
except ImportError as err:  # the reference is optional: only benchmarks need it
    raise ImportError(f"{err}: install envs/local/requirements-reference.txt (with --no-deps)") from err

# Loss weights and optimizer settings: the defaults of exaforce's LossConfig / OptimConfig.
ENERGY_WEIGHT, FORCES_WEIGHT, STRESS_WEIGHT = (LossConfig().energy_weight, LossConfig().forces_weight,
                                               LossConfig().stress_weight)
LR, GRAD_CLIP = OptimConfig().lr, OptimConfig().grad_clip


def build_matris(width: int, blocks: int, cutoff: float, three_body_cutoff: float,
                 dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """MatRIS with random weights; `width` sets all feature dims and the readout MLP, `blocks` its layers."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MatRIS(  # prints "MatRIS initialized with <count> parameters"
            num_layers=blocks,
            node_feat_dim=width,
            edge_feat_dim=width,
            three_body_feat_dim=width,
            mlp_hidden_dims=(width, width),
            pairwise_cutoff=cutoff,
            three_body_cutoff=three_body_cutoff,
        )
    return model.to(dtype).train()


def matris_param_count(model: torch.nn.Module) -> int:
    """All parameters, as MatRIS's own `get_params()` (its unused magmom head included)."""
    return sum(p.numel() for p in model.parameters())


def label_tensors(atoms_list: Sequence[Atoms], energies: Sequence[float], forces: Sequence[np.ndarray],
                  stresses: Sequence[np.ndarray], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Every reference step's targets: atoms per graph, energy per atom (eV), forces (N, 3) eV/Å,
    stress (G, 3, 3) in GPa (ASE sign) from ASE Voigt 6 in eV/Å³."""
    natoms_G = torch.tensor([len(atoms) for atoms in atoms_list], dtype=dtype)
    energy_per_atom_G = torch.as_tensor(np.asarray(energies), dtype=dtype) / natoms_G
    forces_N3 = torch.as_tensor(np.concatenate(forces), dtype=dtype)
    stress_G33 = torch.as_tensor(
        np.stack([voigt_6_to_full_3x3_stress(s) for s in stresses]) * EV_PER_A3_IN_GPA, dtype=dtype)
    return natoms_G, energy_per_atom_G, forces_N3, stress_G33


def make_matris_step(model: torch.nn.Module, atoms_list: Sequence[Atoms], energies: Sequence[float],
                     forces: Sequence[np.ndarray], stresses: Sequence[np.ndarray],
                     graphs: Sequence[RadiusGraph] | None = None) -> Callable[[], None]:
    """A closure doing one full training step of `model` on the batch `atoms_list`.

    Labels: total energy (eV), forces (N, 3) eV/Å, stress as ASE Voigt 6 in eV/Å³.
    Graph conversion: MatRIS ships no trainer, but its converter states that "training and
    DataLoader workers always build on CPU", i.e. per sample as the dataset is read (the CHGNet
    `StructureData.__getitem__` pattern it is derived from). With `graphs=None` the closure does
    that: it builds the neighbour lists itself, inside the step. `graphs` (from `matris_graphs`,
    built once by the caller) keeps graph building out of the step, the treatment `exaforce bench
    step` gives every model. Its data sets hold pymatgen Structures, so ase → Structure happens
    once, here, not per step.
    """
    dtype = next(model.parameters()).dtype
    structures = matris_structures(atoms_list) if graphs is None else None
    _, energy_per_atom_G, forces_N3, stress_G33 = label_tensors(atoms_list, energies, forces, stresses, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)

    def step() -> None:
        batch = matris_graphs(model, structures, atoms_list, dtype) if graphs is None else graphs
        optimizer.zero_grad(set_to_none=True)
        # is_training=True: MatRIS's own create_graph=True path for forces and stress.
        pred = model(batch, task="efs", is_training=True, mode="torch")
        loss = (ENERGY_WEIGHT * (pred["e"] - energy_per_atom_G).pow(2).mean()
                + FORCES_WEIGHT * (torch.cat(pred["f"]) - forces_N3).pow(2).mean()
                + STRESS_WEIGHT * (torch.stack(pred["s"]) - stress_G33).pow(2).mean())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()

    return step


def matris_structures(atoms_list: Sequence[Atoms]) -> list:
    """The batch as the pymatgen Structures MatRIS's converter reads."""
    return [AseAtomsAdaptor.get_structure(atoms) for atoms in atoms_list]


def matris_graphs(model: torch.nn.Module, structures: Sequence, atoms_list: Sequence[Atoms],
                  dtype: torch.dtype) -> list[RadiusGraph]:
    """MatRIS's own graphs of a batch (its CPU converter on the pymatgen Structures), in `dtype`."""
    return [_as_dtype(model.graph_converter(s, atomic_numbers=a.numbers, frac_coords=a.get_scaled_positions(False),
                                            lattice_matrix=a.cell.array, mode="torch"), dtype)
            for s, a in zip(structures, atoms_list)]


def _as_dtype(graph: RadiusGraph, dtype: torch.dtype) -> RadiusGraph:
    """MatRIS's converter always returns float32 geometry; the batch dtype follows the lattice."""
    if dtype == torch.float32:
        return graph
    fields = graph.to_dict()
    for name in ("atom_frac_coord", "lattice", "neighbor_image"):
        fields[name] = fields[name].to(dtype)
    return RadiusGraph.from_dict(fields)
