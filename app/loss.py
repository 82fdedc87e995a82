"""The training loss on energy, forces and stress, per structure.

Per-structure terms make the loss decomposable across ranks: the global mean over a global batch
is the sum of every rank's per-structure sums divided by the global batch size, so the averaged
gradient of a distributed step equals the single-process gradient of the same global batch.
"""

from __future__ import annotations

import torch

from exaforce.config import LossConfig
from exaforce.graph import GraphBatch
from exaforce.model.potential import Prediction

EV_PER_A3_IN_GPA = 160.21766208  # 1 eV/Å³ in GPa (CODATA 2014, as ase.units.GPa)


def structure_losses(pred: Prediction, batch: GraphBatch, cfg: LossConfig) -> dict[str, torch.Tensor]:
    """Squared errors per structure (shape G): energy per atom, force components (the mean over its atoms,
    or their sum / loss.forces_per_atoms), stress in GPa."""
    natoms_G = batch.natoms_G.to(pred.energy_G.dtype)
    energy_G = ((pred.energy_G - batch.energy_G) / natoms_G).pow(2)
    force_sq_N = (pred.forces_N3 - batch.forces_N3).pow(2).mean(-1)
    per = cfg.forces_per_atoms if cfg.forces_per_atoms > 0 else natoms_G  # every atom alike, or every structure
    forces_G = torch.zeros_like(energy_G).index_add(0, batch.graph_N, force_sq_N) / per
    # Stress counts only where both a label and a periodic cell exist; NaN never reaches the gradient.
    has_stress_G = batch.periodic_G & torch.isfinite(batch.stress_G6).all(-1)
    diff_G6 = (pred.stress_G6.nan_to_num(0.0) - batch.stress_G6.nan_to_num(0.0)) * EV_PER_A3_IN_GPA
    stress_G = torch.where(has_stress_G, diff_G6.pow(2).mean(-1), torch.zeros_like(energy_G))
    total_G = cfg.energy_weight * energy_G + cfg.forces_weight * forces_G + cfg.stress_weight * stress_G
    return {"total": total_G, "energy": energy_G, "forces": forces_G, "stress": stress_G}
