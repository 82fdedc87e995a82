"""ASE calculator: energy, forces and stress of an exaforce potential (no create_graph: inference)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from exaforce import checkpoint
from exaforce.config import DTYPES, ModelConfig, model_from_dict, model_preset
from exaforce.model.graph import batch_from_atoms
from exaforce.model.potential import Potential, energy_forces_stress



class ExaforceCalculator(Calculator):
    """Stress is reported for fully periodic cells only (ASE sign and Voigt order, eV/Å³)."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model: Potential, dtype: str = "float64", head: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: must be one of {sorted(DTYPES)}")
        heads = model.cfg.heads
        if head is not None and head not in heads:
            raise ValueError(f"head {head!r}: this model's heads are {list(heads)}")
        self.head_index = heads.index(head) if head is not None else 0  # which dataset/fidelity's energy
        self.dtype = DTYPES[dtype]
        self.model = model.to(self.dtype).eval()
        self._species_of = model.species_table()

    @classmethod
    def from_preset(cls, name: str, seed: int = 0, dtype: str = "float64", head: str | None = None,
                    **overrides) -> "ExaforceCalculator":
        """Random weights (for tests and benchmarks) at a named model size."""
        import dataclasses

        cfg: ModelConfig = dataclasses.replace(model_preset(name), **overrides)
        torch.manual_seed(seed)
        return cls(Potential(cfg), dtype=dtype, head=head)

    @classmethod
    def from_checkpoint(cls, path: str | Path, dtype: str = "float64", head: str | None = None) -> "ExaforceCalculator":
        state = checkpoint.load(Path(path))
        model = Potential(model_from_dict(state["config"]["model"]))
        model.load_state_dict(state["model"])
        return cls(model, dtype=dtype, head=head)

    def calculate(self, atoms: Atoms | None = None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        unknown = sorted({s for s, z in zip(self.atoms.get_chemical_symbols(), self.atoms.numbers)
                          if self._species_of[z] < 0})
        if unknown:
            raise ValueError(f"elements {unknown} are not in this model's elements {list(self.model.cfg.elements)}")
        cfg = self.model.cfg
        batch = batch_from_atoms([self.atoms], self._species_of, cfg.cutoff, cfg.three_body_cutoff,
                                 self.head_index, len(cfg.heads))
        pred = energy_forces_stress(self.model, batch.to("cpu", self.dtype), training=False)
        energy = float(pred.energy_G[0].detach())
        self.results = {"energy": energy, "free_energy": energy,
                        "forces": pred.forces_N3.detach().numpy().astype(np.float64)}
        if self.atoms.pbc.all():
            self.results["stress"] = pred.stress_G6[0].detach().numpy().astype(np.float64)
