"""ASE calculator: energy, forces and stress of an exaforce potential (no create_graph: inference).

    calc = ExaforceCalculator.from_checkpoint("runs/x/checkpoints/step-00001000.pt", head="pbe")
    calc = ExaforceCalculator.from_preset("small", seed=0)      # random weights: tests, benchmarks
    calc = ExaforceCalculator.from_checkpoint(path, graph_parallel=True)  # under mpiexec -n K: one
        # structure's atoms split over the K ranks, every rank gets the whole result (run the same
        # script on every rank: ASE's dynamics then move the same atoms everywhere); graph_parallel =
        # "exchange" | "ghost" picks the halo (True: "auto", exchange for the light block, ghost for matris)

Energy in eV, forces in eV/Å, stress in eV/Å³ (ASE sign, Voigt order xx yy zz yz xz xy). Stress is
defined for fully periodic cells only; asking for it on a molecule raises ASE's
PropertyNotImplementedError. Every structure is evaluated with one energy head (dataset/fidelity),
chosen by name when the calculator is made.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from exaforce.config import DEVICE_KINDS, DTYPES
from exaforce.device import choose_device, to_device
from exaforce.graph import batch_from_atoms
from exaforce.io.schema import check_geometry
from exaforce.model.potential import Potential, energy_forces_stress
from exaforce.model_io import load_trained, preset_model
from exaforce.parallel.graph_parallel import GraphParallel
from exaforce.parallel.topology import Topology


def head_index(model: Potential, head: str | None) -> int:
    """The position of energy head `head` (None: the first) in the model's heads; a clear error otherwise."""
    heads = model.cfg.heads
    if head is None:
        return 0
    if head not in heads:
        raise ValueError(f"head {head!r}: this model's heads are {list(heads)}")
    return heads.index(head)


class ExaforceCalculator(Calculator):
    """Takes the model over: converts it to `dtype` and `device`, eval mode, parameters frozen
    (only positions and strain need gradients)."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model: Potential, dtype: str = "float64", head: str | None = None,
                 device: str = "auto", graph_parallel: bool | str = False, **kwargs):
        super().__init__(**kwargs)
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: must be one of {sorted(DTYPES)}")
        self.head = head if head is not None else model.cfg.heads[0]
        self.head_index = head_index(model, head)
        # "auto" | "cpu" | "cuda" | "xpu" as run.device (one process: local rank 0), or an explicit "cuda:1"
        self.dtype = DTYPES[dtype]
        self.device = choose_device(device) if device in DEVICE_KINDS else torch.device(device)
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self._species_of = model.species_table()
        self.graph: GraphParallel | None = None
        if graph_parallel:  # collective: every rank of the job constructs its calculator; True: the "auto" halo
            halo = graph_parallel if isinstance(graph_parallel, str) else "auto"
            self.graph = GraphParallel.for_model(Topology.one_graph_group(), model, min_atoms=0, halo=halo)

    @classmethod
    def from_preset(cls, name: str, seed: int = 0, dtype: str = "float64", head: str | None = None,
                    device: str = "auto", graph_parallel: bool | str = False, **overrides) -> "ExaforceCalculator":
        """Random weights (for tests and benchmarks) at a named model size; keyword arguments
        override fields of the preset's ModelConfig (e.g. elements=("Cu", "Au"))."""
        return cls(preset_model(name, seed, **overrides), dtype=dtype, head=head, device=device,
                   graph_parallel=graph_parallel)

    @classmethod
    def from_checkpoint(cls, path: str | Path, dtype: str = "float64", head: str | None = None,
                        device: str = "auto", graph_parallel: bool | str = False) -> "ExaforceCalculator":
        """The trained model of a checkpoint file, or of a run folder's latest checkpoint."""
        return cls(load_trained(path).build(), dtype=dtype, head=head, device=device, graph_parallel=graph_parallel)

    def calculate(self, atoms: Atoms | None = None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        unknown = sorted({s for s, z in zip(self.atoms.get_chemical_symbols(), self.atoms.numbers)
                          if self._species_of[z] < 0})
        if unknown:
            raise ValueError(f"elements {unknown} are not in this model's elements {list(self.model.cfg.elements)}")
        check_geometry("ExaforceCalculator: the atoms", 0, self.atoms.positions, self.atoms.cell.array, self.atoms.pbc)
        cfg = self.model.cfg
        atoms = self.atoms
        if self.graph is not None:  # rank 0's geometry everywhere: every rank must cut the same structure
            atoms = atoms.copy()
            atoms.positions, atoms.cell = self.graph.topo.from_root((atoms.positions, atoms.cell.array))  # collective
        batch = to_device(batch_from_atoms([atoms], self._species_of, cfg.cutoff, cfg.three_body_cutoff,
                                           self.head_index, len(cfg.heads)), self.device, self.dtype)
        pred = energy_forces_stress(self.model, batch, training=False) if self.graph is None \
            else self.graph.predict_alone(self.model, batch)  # collective over the job
        energy = float(pred.energy_G[0].detach())  # a device→host sync (on a GPU), once per call
        self.results = {"energy": energy, "free_energy": energy,
                        "forces": pred.forces_N3.detach().cpu().numpy().astype(np.float64)}
        if self.atoms.pbc.any():
            self.results["stress"] = pred.stress_G6[0].detach().cpu().numpy().astype(np.float64)
