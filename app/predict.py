"""`exaforce predict`: energy, forces and stress of every structure of a BP5 dataset, on all ranks.

Data flow: model (checkpoint or preset) on every rank → fixed batches → each rank reads its
contiguous run of batches (one hyperslab) and checks it, the ranks agree → per batch: graph,
energy, autograd.grad without create_graph → gather to rank 0 in input order → one BP5 dataset,
written atomically, with the input's structures and the predicted labels (method
"exaforce:<checkpoint>").

Why fixed batches: a batched matmul may sum a row in a different order when the batch around it
changes, so a structure's last bits depend on its batch companions. Batches are therefore a
function of the dataset and `batch_size` alone — structures [k·B, (k+1)·B) — and ranks only choose
which batches they run, so 1, 2 or N ranks write bit-identical numbers (at the same threads per rank).

With graph parallelism (`--gp K`) the ranks form groups of K that each take a run of batches and
split every structure's atoms over the group (exaforce.parallel.graph_parallel): one structure
larger than a rank's memory. Sums over the group then change the last bits (float rounding).

Shapes: S structures, N atoms, B batches, W ranks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from exaforce.calculator import head_index
from exaforce.config import DTYPES
from exaforce.console import ProgressReport
from exaforce.device import describe, rank_device, to_device
from exaforce.training.data import check_frames
from exaforce.io.atomic import DiskFullError
from exaforce.io.bp import RESERVED_ATTRS, is_dataset, open_bp, write_bp
from exaforce.io.schema import DataError, Frames
from exaforce.graph import build_batch
from exaforce.model.potential import Potential, energy_forces_stress
from exaforce.model_io import load_trained, preset_model
from exaforce.parallel.graph_parallel import GraphParallel
from exaforce.parallel.topology import Topology


class PredictError(ValueError):
    """A request predict cannot carry out (output exists, output = input); nothing is written."""


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: a checkpoint, or a preset with seeded random weights (benchmarks)."""

    checkpoint: str | None = None
    preset: str | None = None
    seed: int = 0

    def load(self, dtype: torch.dtype) -> tuple[Potential, str]:
        """The model in eval mode with frozen parameters, and its label for the output's `method`."""
        if self.checkpoint is not None:
            trained = load_trained(self.checkpoint)
            model, label = trained.build(dtype), str(trained.path.resolve())
        else:
            model, label = preset_model(self.preset, self.seed).to(dtype), f"preset:{self.preset}:seed{self.seed}"
        return model.eval().requires_grad_(False), label


def batch_plan(natoms_S: np.ndarray, batch_size: int, world: int) -> list[np.ndarray]:
    """Per rank, the start indices of its batches: fixed batches of `batch_size` consecutive
    structures, dealt to ranks as contiguous runs of about equal atom counts (each batch goes to the
    rank whose share of the cumulative atom count holds its midpoint)."""
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size}: must be >= 1")
    starts_B = np.arange(0, len(natoms_S), batch_size)
    if not len(starts_B):
        return [starts_B for _ in range(world)]
    atoms_B = np.add.reduceat(natoms_S, starts_B)
    middle_B = np.cumsum(atoms_B) - atoms_B / 2
    rank_B = np.minimum((world * middle_B / atoms_B.sum()).astype(np.int64), world - 1)
    return [starts_B[rank_B == r] for r in range(world)]


def predict(source: ModelSource, data: str | Path, out: str | Path, topo: Topology, batch_size: int = 16,
            head: str | None = None, dtype: str = "float32", overwrite: bool = False,
            log: Callable[[str], None] = print, device: str = "auto", halo: str = "auto") -> dict:
    """Collective. Writes the predictions to `out` (rank 0 writes) and returns the summary on every
    rank: counts, seconds, throughput (structures/s and atoms/s over the slowest rank's loop).
    `device` as run.device: each rank on its own (exaforce.device). `halo`: graph parallelism's halo
    (exaforce.parallel.graph_parallel: auto | exchange | ghost)."""
    data, out = Path(data), Path(out)
    if out.resolve() == data.resolve():
        raise PredictError(f"--out {out}: is the input dataset; write the predictions elsewhere")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise PredictError(f"--out {out}: already exists (pass --overwrite to replace it)")
        if not is_dataset(out):  # --overwrite replaces a dataset, never a user's other files
            raise PredictError(f"--out {out}: exists and is not a BP5 dataset; refusing to replace it")
    if dtype not in DTYPES:
        raise PredictError(f"--dtype {dtype}: must be one of {sorted(DTYPES)}")
    if batch_size < 1:
        raise PredictError(f"--batch-size {batch_size}: must be >= 1")
    wall0 = time.perf_counter()
    on = rank_device(device, topo, key="--device")  # collective
    model, label = source.load(DTYPES[dtype])
    model = model.to(on)
    h = head_index(model, head)
    layout = topo.layout  # dp groups of gp ranks (graph parallelism: each batch's atoms over its group)
    try:
        graph = GraphParallel.for_model(topo, model, min_atoms=0, halo=halo) if layout.gp > 1 else None
    except ValueError as error:
        raise PredictError(f"--gp-halo {halo}: {error}") from None
    group = layout.dp_index(topo.rank)
    with open_bp(data) as dataset:
        plan = batch_plan(dataset.natoms_S, batch_size, layout.dp)
        split = f" ({layout.dp} group(s) of {layout.gp} ranks, each structure's atoms split over its group)" \
            if graph else ""
        log(f"predict: {dataset.n_structures} structures ({dataset.n_atoms} atoms) of {data} with {label}, "
            f"head {model.cfg.heads[h]!r}, {dtype}, batches of {batch_size} on {topo.world_size} rank(s){split} "
            f"(rank 0: {describe(on)})")
        t0 = time.perf_counter()
        first, shard = _read_shard(dataset, plan[group], batch_size, model.species_table(), topo)  # collective
        read_s = time.perf_counter() - t0
        with ProgressReport("predict (rank 0's share)", enabled=topo.is_root) as progress:
            mine = _run_batches(model, shard, plan[group] - first, batch_size, h, DTYPES[dtype], on, progress, graph)
        mine.times["read"] = read_s
        mine.times["loop"] += read_s

        # Collectives: the slowest rank sets the throughput; predictions (each group's from its first
        # rank) gather to rank 0 in input order.
        times = {k: topo.max(v) for k, v in mine.times.items()}
        writers = [layout.gp_index(r) == 0 for r in range(topo.world_size)]
        structures_W = [int(sum(min(batch_size, dataset.n_structures - s) for s in plan[layout.dp_index(r)]))
                        if writers[r] else 0 for r in range(topo.world_size)]
        atoms_W = [int(sum(dataset.natoms_S[s:s + batch_size].sum() for s in plan[layout.dp_index(r)]))
                   if writers[r] else 0 for r in range(topo.world_size)]
        if not writers[topo.rank]:
            mine = _Predictions(np.zeros(0), np.zeros((0, 3)), np.zeros((0, 6)), mine.times)
        energy_S = topo.gather_rows_to_root(mine.energy_S, structures_W, ())
        forces_N3 = topo.gather_rows_to_root(mine.forces_N3, atoms_W, (3,))
        stress_S6 = topo.gather_rows_to_root(mine.stress_S6, structures_W, (6,))
        error = None
        if topo.is_root:
            try:
                _write(dataset, energy_S, forces_N3, stress_S6, out, method=f"exaforce:{label}", overwrite=overwrite,
                       attrs={"predicted_from": str(data.resolve()), "head": model.cfg.heads[h], "dtype": dtype,
                              "batch_size": batch_size})
            except DiskFullError as err:  # names the path already
                error = str(err)
            except Exception as err:  # noqa: BLE001 — every rank must learn of it, not only the writer
                error = f"{out}: writing the predictions failed: {err}"
        error = topo.from_root(error)  # collective: all ranks fail alike, or none
        if error:
            raise PredictError(error)
        n_structures, n_atoms = dataset.n_structures, dataset.n_atoms
    loop_s = times["loop"]
    summary = {"structures": n_structures, "atoms": n_atoms, "ranks": topo.world_size, "gp": layout.gp,
               "batch_size": batch_size,
               "dtype": dtype, "device": str(on), "head": model.cfg.heads[h], "model": label, "out": str(out),
               "threads_per_rank": torch.get_num_threads(), "loop_s": loop_s, "read_s": times["read"],
               "graph_s": times["graph"], "model_s": times["model"], "wall_s": time.perf_counter() - wall0,
               "structures_per_s": n_structures / loop_s, "atoms_per_s": n_atoms / loop_s}
    log(f"predicted {n_structures} structures ({n_atoms} atoms) in {loop_s:.2f} s on {topo.world_size} rank(s): "
        f"{summary['structures_per_s']:.1f} structures/s, {summary['atoms_per_s']:.0f} atoms/s "
        f"(slowest rank: read {times['read']:.2f} s, graphs {times['graph']:.2f} s, model {times['model']:.2f} s); "
        f"wrote {out}")
    return summary


def _read_shard(dataset, starts: np.ndarray, batch_size: int, species_of: np.ndarray,
                topo: Topology) -> tuple[int, Frames]:
    """Collective: this rank's structures in one read, checked; if any rank finds a structure the
    model cannot take, every rank raises the same error (ranks agree before they act)."""
    first = int(starts[0]) if len(starts) else 0
    stop = min(int(starts[-1]) + batch_size, dataset.n_structures) if len(starts) else 0
    shard = dataset.read(first, stop - first)
    try:
        check_frames(shard, str(dataset.path), first, species_of)  # unknown elements: file, sample, field
        problem = None
    except DataError as err:
        problem = str(err)
    problems = [p for p in topo.allgather(problem) if p]  # collective
    if problems:
        raise PredictError(problems[0])
    return first, shard


@dataclass
class _Predictions:
    """One rank's predictions, in input order, and where its loop spent its time (seconds)."""

    energy_S: np.ndarray
    forces_N3: np.ndarray
    stress_S6: np.ndarray
    times: dict[str, float]


def _run_batches(model: Potential, shard: Frames, starts: np.ndarray, batch_size: int, head: int,
                 dtype: torch.dtype, device: torch.device = torch.device("cpu"),
                 progress: Callable[[int, int], None] = lambda done, total: None,
                 graph: GraphParallel | None = None) -> _Predictions:
    """Graph → energy → forces/stress for each batch of this rank's shard (`starts` index into the
    shard); no communication, or with `graph` each batch over the GP group (collective over it)."""
    cfg, species_of = model.cfg, model.species_table()
    times = {"graph": 0.0, "model": 0.0}
    energy, forces, stress = [np.zeros(0)], [np.zeros((0, 3))], [np.zeros((0, 6))]
    loop0 = time.perf_counter()
    for start in starts.tolist():
        t0 = time.perf_counter()
        frames = shard.select(np.arange(start, min(start + batch_size, len(shard))))
        batch = build_batch(frames, species_of, cfg.cutoff, cfg.three_body_cutoff, np.full(len(frames), head),
                            len(cfg.heads))
        batch = to_device(batch, device, dtype)
        t1 = time.perf_counter()
        # autograd.grad without create_graph
        pred = energy_forces_stress(model, batch, training=False) if graph is None else graph.predict_alone(model, batch)
        energy.append(pred.energy_G.detach().double().cpu().numpy())
        forces.append(pred.forces_N3.detach().double().cpu().numpy())
        stress.append(pred.stress_G6.detach().double().cpu().numpy())
        times["graph"] += t1 - t0
        times["model"] += time.perf_counter() - t1
        progress(min(start + batch_size, len(shard)), len(shard))
    times["loop"] = time.perf_counter() - loop0
    return _Predictions(np.concatenate(energy), np.concatenate(forces), np.concatenate(stress), times)


def _write(dataset, energy_S: np.ndarray, forces_N3: np.ndarray, stress_S6: np.ndarray, out: Path, method: str,
           overwrite: bool, attrs: dict) -> None:
    """The input's structures with the predicted labels, atomically (write_bp: temp → fsync → rename).
    Charge and spin stay (they describe the system); magnetic moments go (a label not predicted)."""
    frames = dataset.read(0, dataset.n_structures)
    predicted = Frames(numbers_N=frames.numbers_N, positions_N3=frames.positions_N3, forces_N3=forces_N3,
                       cell_S33=frames.cell_S33, pbc_S3=frames.pbc_S3, energy_S=energy_S, stress_S6=stress_S6,
                       natoms_S=frames.natoms_S, charge_S=frames.charge_S, spin_S=frames.spin_S)
    kept = {k: v for k, v in dataset.attrs.items() if k not in RESERVED_ATTRS and k not in attrs}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bp(predicted, out, dataset.name, {**kept, **attrs}, method=method, overwrite=overwrite)
