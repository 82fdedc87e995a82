"""Label statistics of a dataset, stored with it as attributes and shown by `exaforce data inspect`.

Why store them: a trainer normalising energies, or a person choosing loss weights across
fidelities, should not have to read terabytes to learn that one source's energies sit at
-3.5 eV/atom and another's at -1500 eV/atom.
"""

from __future__ import annotations

import numpy as np

from exaforce.io.schema import Frames

Stat = int | float
STAT_KEYS = ("n_structures", "n_atoms", "n_with_stress", "energy_mean", "energy_std", "energy_per_atom_mean",
             "energy_per_atom_std", "force_rms")


def label_stats(frames: Frames) -> dict[str, Stat]:
    """Counts, energy and energy-per-atom mean/std (eV), and the force RMS (eV/Å).

    The force RMS is over Cartesian components, sqrt(mean(F_i²)), the scale the trainer uses.
    Population std (ddof=0), so a one-structure dataset has std 0 rather than NaN.
    """
    per_atom_S = frames.energy_S / frames.natoms_S
    has_stress_S = ~np.isnan(frames.stress_S6).any(axis=1)
    return {
        "n_structures": len(frames),
        "n_atoms": frames.n_atoms,
        "n_with_stress": int(has_stress_S.sum()),
        "energy_mean": float(frames.energy_S.mean()),
        "energy_std": float(frames.energy_S.std()),
        "energy_per_atom_mean": float(per_atom_S.mean()),
        "energy_per_atom_std": float(per_atom_S.std()),
        "force_rms": float(np.sqrt(np.mean(frames.forces_N3 ** 2))),
    }
