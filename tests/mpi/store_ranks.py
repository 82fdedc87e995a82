"""Run under `mpiexec -n K` with OUT N: a SampleStore over N synthetic structures sharded by
shard_range (uneven shards; empty ones when K > N). Every rank builds the same dataset, keeps its
shard, and checks what it fetches against `Frames.select` of the whole dataset. Rank 0 writes the
per-rank results and the per-epoch coverage counts of the global sampler (io/sampler.py) (with and without the
store) as JSON."""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

from exaforce.io.sampler import deal, epoch_order, global_batches, shard_range
from exaforce.io.schema import Frames
from exaforce.io.store import SampleStore
from exaforce.io.synth import synthesize
from exaforce.parallel.topology import Topology

EPOCHS, GLOBAL_BATCH, SEED = 2, 5, 7
OWNER_WAIT_S = 30.0


def dataset(n: int) -> Frames:
    """The same Frames on every rank: NaN stress rows, and any optional schema field filled."""
    full = Frames.from_atoms(synthesize(n, seed=3))
    full.stress_S6[::3] = np.nan  # structures without stress must come back as NaN rows
    rng = np.random.default_rng(11)
    for f in dataclasses.fields(full):  # charge_S, spin_S, magmoms_N… when the schema has them
        if getattr(full, f.name) is None:
            rows = full.n_atoms if f.name.rsplit("_", 1)[-1].startswith("N") else len(full)
            setattr(full, f.name, rng.normal(size=rows))
    return full


def reference(full: Frames, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Every column of full.select(idx), optional ones by hand in case select does not carry them yet."""
    picked = full.select(idx)
    offsets = full.offsets_S
    atoms = np.concatenate([np.arange(offsets[s], offsets[s] + full.natoms_S[s]) for s in idx]) \
        if len(idx) else np.zeros(0, np.int64)
    out = {}
    for f in dataclasses.fields(full):
        value = getattr(picked, f.name)
        if value is None and getattr(full, f.name) is not None:
            per_atom = f.name.rsplit("_", 1)[-1].startswith("N")
            value = getattr(full, f.name)[atoms if per_atom else idx]
        out[f.name] = value
    return out


def mismatches(got: Frames, want: dict[str, np.ndarray]) -> list[str]:
    """Fields whose dtype, shape or values (NaN == NaN) differ."""
    bad = []
    for name, w in want.items():
        g = getattr(got, name)
        if (g is None) != (w is None) or (w is not None and (
                g.dtype != w.dtype or g.shape != w.shape or not np.array_equal(g, w, equal_nan=True))):
            bad.append(name)
    return bad


def main(out_path: str, n: int) -> None:
    topo = Topology.from_mpi()
    comm, rank, world = topo.world, topo.rank, topo.world_size
    full = dataset(n)
    start, count = shard_range(n, rank, world)
    shard = full.select(np.arange(start, start + count))
    record: dict = {"rank": rank, "shard": [start, count]}
    rng = np.random.default_rng(100 + rank)

    with SampleStore(shard, start, comm) as store:
        record["n_structures"] = store.n_structures
        record["natoms_equal"] = bool(np.array_equal(store.natoms, full.natoms_S))
        record["local_nbytes"] = store.local_nbytes
        # (a) every index, random order, mixed owners, repeats; a contiguous sweep; nothing.
        cases = {"random_repeats": np.concatenate([rng.permutation(n), rng.integers(0, n, size=2 * n)]),
                 "sweep": np.arange(n), "reversed": np.arange(n)[::-1], "empty": np.zeros(0, np.int64)}
        record["mismatches"] = {name: mismatches(store.fetch(idx), reference(full, idx))
                                for name, idx in cases.items()}
        try:
            store.fetch([n])
            record["out_of_range"] = None
        except IndexError as err:
            record["out_of_range"] = str(err)
        try:
            store.fetch([0.0])
            record["float_indices"] = None
        except TypeError as err:
            record["float_indices"] = str(err)

        # (b) global shuffling: identify what was fetched by its (unique) energy, count per epoch.
        by_energy = {float(e): s for s, e in enumerate(full.energy_S)}
        ones, every = np.ones(n), np.ones(n, bool)
        if n >= world:
            steps = global_batches(ones, every, max(GLOBAL_BATCH, world), world, SEED)
        else:  # fewer structures than ranks (training refuses this): one batch per epoch, some ranks idle
            steps = ((e, epoch_order(ones, every, SEED, e)) for e in itertools.count())
        seen_store, seen_plain, fetched_ok = [], [], True
        for epoch, epoch_steps in itertools.groupby(steps, key=lambda step: step[0]):
            if epoch == EPOCHS:
                break
            ids_store, ids_plain = [], []
            for _, batch in epoch_steps:
                idx = deal(batch, full.natoms_S[batch].astype(float), world)[rank]  # balanced by atoms
                got = store.fetch(idx)
                ids = [by_energy[float(e)] for e in got.energy_S]
                fetched_ok &= ids == idx.tolist() and not mismatches(got, reference(full, idx))
                ids_store += ids
                ids_plain += idx.tolist()
            seen_store.append(ids_store)
            seen_plain.append(ids_plain)
        record["fetched_ok"] = bool(fetched_ok)
        record["energies_unique"] = len(by_energy) == n

        # Not collective, and the owner need not enter MPI: rank 0 waits outside MPI (polling
        # files) until every other rank has fetched rank 0's whole shard. If a fetch needed rank 0
        # to progress, rank 0 would give up after OWNER_WAIT_S and report it.
        comm.Barrier()
        flags = [Path(out_path).parent / f"{Path(out_path).stem}.fetched{r}" for r in range(1, world)]
        own0 = np.arange(shard_range(n, 0, world)[1])
        if rank == 0:
            deadline = time.monotonic() + OWNER_WAIT_S
            while not all(f.exists() for f in flags) and time.monotonic() < deadline:
                time.sleep(0.01)
            record["owner_outside_mpi_served"] = all(f.exists() for f in flags)
        else:
            record["owner_outside_mpi_ok"] = not mismatches(store.fetch(own0), reference(full, own0))
            flags[rank - 1].touch()
    try:
        store.fetch([0])
        record["after_free"] = None
    except RuntimeError as err:
        record["after_free"] = str(err)

    # Shards that do not fit together: the same ValueError on every rank, before any window exists.
    try:
        SampleStore(shard, start + (rank == world - 1), comm).free()
        record["bad_shards"] = None
    except ValueError as err:
        record["bad_shards"] = str(err)

    # Shards that disagree on a column's dtype: the same ValueError on every rank.
    try:
        odd = dataclasses.replace(shard, energy_S=shard.energy_S.astype(np.float32)) if rank == 0 else shard
        SampleStore(odd, start, comm).free()
        record["bad_dtype"] = None
    except ValueError as err:
        record["bad_dtype"] = str(err)

    records = comm.gather(record, root=0)
    plain = comm.gather(seen_plain, root=0)
    fetched = comm.gather(seen_store, root=0)
    if rank == 0:
        def counts(per_rank: list[list[list[int]]], epoch: int) -> list[int]:
            return np.bincount([i for r in per_rank for i in r[epoch]], minlength=n).tolist()

        result = {"world": world, "n": n, "ranks": records,
                  "counts_store": [counts(fetched, e) for e in range(EPOCHS)],
                  "counts_sampler": [counts(plain, e) for e in range(EPOCHS)],
                  "epoch_orders": [epoch_order(np.ones(n), np.ones(n, bool), SEED, e).tolist()
                                   for e in range(EPOCHS)]}
        with open(out_path, "w") as f:
            json.dump(result, f)
    comm.Barrier()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
