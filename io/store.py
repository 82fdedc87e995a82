"""A distributed in-memory sample store: any rank reads any structure over MPI one-sided communication.

Why: global shuffling (every step draws from the whole dataset) without every rank holding the whole
dataset. Each rank keeps only its contiguous shard, packed into one MPI window; a structure owned by
another rank is read with a passive-target `Get`, so the owner does nothing to serve it.

Memory per rank: the packed shard (about the size of its `Frames` columns, each field padded to 8
bytes per structure) plus a replicated index of 28 bytes per structure of the whole dataset (owner
int32, byte offset, byte length and natoms int64; 100 M structures ≈ 2.8 GB per rank). The store
keeps no reference to the shard it was built from: drop it after construction (until then the
shard is held twice).

Collective: construction (one allgather, one window allocation, one barrier) and `free()`, on every
rank of `comm` in the same order. `fetch` is NOT collective: any rank may fetch any structures at
any time between the two, as often as it likes, while the other ranks compute. Locks are taken
with MPI_MODE_NOCHECK (the store is read-only after construction), so no lock request has to be
served by the owner; measured on one node, a fetch completes while the owner sits in pure Python.
Across nodes, a network without one-sided Get in hardware serves it only when the owner enters
MPI (MPICH: MPIR_CVAR_ASYNC_PROGRESS=1 in the job template if fetches stall).

Record layout: structure s of a shard is one record, the fields of `Frames` in declaration order,
each padded to a multiple of 8 bytes so every field starts aligned to its item size; per-atom
fields (`*_N…`) hold natoms rows, per-structure fields (`*_S…`) one row. Optional fields that are
None on every non-empty shard are not stored and come back as None.

Shapes: S structures, N atoms, K requested structures, F stored fields, W ranks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from exaforce.io.schema import Frames

if TYPE_CHECKING:
    from mpi4py import MPI

ALIGN = 8  # bytes; every field of a record starts at a multiple of this (largest supported item size)


@dataclass(frozen=True, slots=True)
class Field:
    """How one Frames column is stored: per atom ('N') or per structure ('S'), dtype, row shape."""

    name: str
    per: str              # 'N' or 'S'
    dtype: str            # numpy dtype string, e.g. '<f8'
    row: tuple[int, ...]  # trailing shape of one row, e.g. (3,) for positions_N3, () for energy_S

    @property
    def row_elems(self) -> int:
        return math.prod(self.row)

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize


class SampleStore:
    """Every structure of a dataset, sharded over `comm`, readable by any rank with `fetch`.

    Built collectively: rank r passes `shard`, the `Frames` of global structures
    [start, start + len(shard)), as `shard_range(n, r, world)` gives them (shards contiguous, in
    rank order, covering [0, n); an empty shard is fine). Every rank raises the same ValueError if
    the shards do not fit together. Use as a context manager (frees on a clean exit), or call
    `free()` on every rank.
    """

    def __init__(self, shard: Frames, start: int, comm: "MPI.Intracomm"):
        from mpi4py import MPI

        self.rank, self.world = comm.Get_rank(), comm.Get_size()
        local_fields, local_error = _describe(shard)
        local_natoms_S = np.asarray(shard.natoms_S, dtype=np.int64)
        # Collective: the one exchange that builds the replicated index. Errors travel with it so
        # that every rank reaches the same verdict before the (collective) window allocation.
        gathered = comm.allgather((int(start), local_natoms_S, local_fields, local_error))
        self.fields: tuple[Field, ...] = _agree(gathered)
        self.natoms: np.ndarray = np.concatenate([g[1] for g in gathered]).astype(np.int64)  # replicated, per structure
        counts_W = np.array([len(g[1]) for g in gathered], dtype=np.int64)
        self.first_W = np.concatenate([[0], np.cumsum(counts_W)]).astype(np.int64)  # shard r is [first_W[r], first_W[r+1])
        self.owner: np.ndarray = np.repeat(np.arange(self.world, dtype=np.int32), counts_W)
        self.nbytes: np.ndarray = _record_sizes_SF(self.fields, self.natoms).sum(axis=1)  # int64
        # Byte offset of each record in its owner's window: a running sum restarted at every shard.
        cum = np.concatenate([[0], np.cumsum(self.nbytes, dtype=np.int64)])
        self.offset: np.ndarray = cum[:-1] - cum[self.first_W[self.owner]]
        lo, hi = self.first_W[self.rank], self.first_W[self.rank + 1]
        local_bytes = int(cum[hi] - cum[lo])

        # Collective: every rank exposes its packed shard (zero bytes for an empty shard).
        self._win = MPI.Win.Allocate(local_bytes, 1, comm=comm)
        self._local_U8 = np.frombuffer(self._win.tomemory(), dtype=np.uint8)
        # Local stores into window memory belong in an exclusive epoch on oneself (MPI-4 §12.7);
        # the barrier keeps every Get after every owner has finished packing.
        self._win.Lock(self.rank, MPI.LOCK_EXCLUSIVE)
        self._local_U8[:] = 0  # padding bytes are defined too
        _scatter(self.fields, shard, self._local_U8, self.offset[lo:hi], self.natoms[lo:hi])
        self._win.Unlock(self.rank)
        comm.Barrier()  # collective

    @property
    def n_structures(self) -> int:
        return len(self.natoms)

    @property
    def local_nbytes(self) -> int:
        """Bytes of this rank's packed shard (its window size)."""
        return len(self._local_U8)

    def fetch(self, global_indices: Any) -> Frames:
        """The structures at `global_indices`, in that order (repeats allowed), as one Frames.

        Not collective. Each distinct record is read once: local ones are copied from this rank's
        window memory, remote ones with one shared lock epoch per owner rank and one Get per run
        of consecutive indices.
        """
        from mpi4py import MPI

        if self._win is None:
            raise RuntimeError("SampleStore.fetch after free()")
        idx_K = np.asarray(global_indices).reshape(-1)
        if idx_K.size and idx_K.dtype.kind not in "iu":
            raise TypeError(f"SampleStore.fetch: indices must be integers, got {idx_K.dtype}")
        idx_K = idx_K.astype(np.int64, copy=False)
        bad = (idx_K < 0) | (idx_K >= self.n_structures)
        if bad.any():
            raise IndexError(f"SampleStore.fetch: index {int(idx_K[bad][0])} out of range "
                             f"[0, {self.n_structures})")
        uniq_U, inverse_K = np.unique(idx_K, return_inverse=True)  # sorted, so grouped by owner
        len_U = self.nbytes[uniq_U]
        dst_U = np.concatenate([[0], np.cumsum(len_U)]).astype(np.int64)
        recv_U8 = np.empty(int(dst_U[-1]), dtype=np.uint8)
        owner_U, src_U = self.owner[uniq_U], self.offset[uniq_U]
        # A run: consecutive global indices of one owner, hence consecutive bytes of one window.
        new_run = np.ones(len(uniq_U), dtype=bool)
        new_run[1:] = (np.diff(uniq_U) != 1) | (np.diff(owner_U) != 0)
        heads = np.flatnonzero(new_run)
        ends = np.append(heads[1:], len(uniq_U))
        run_owner, run_src = owner_U[heads], src_U[heads]
        run_dst, run_len = dst_U[heads], dst_U[ends] - dst_U[heads]
        for owner in np.unique(run_owner).tolist():
            runs = np.flatnonzero(run_owner == owner).tolist()
            if owner == self.rank:
                for r in runs:  # our own records: a plain copy, no MPI
                    s, d, n = int(run_src[r]), int(run_dst[r]), int(run_len[r])
                    recv_U8[d:d + n] = self._local_U8[s:s + n]
                continue
            # NOCHECK: after construction nobody takes an exclusive lock, so there is nothing to
            # check; without it MPICH waits for the owner to enter MPI to grant the lock.
            self._win.Lock(owner, MPI.LOCK_SHARED, MPI.MODE_NOCHECK)
            for r in runs:
                d, n = int(run_dst[r]), int(run_len[r])
                self._win.Get([recv_U8[d:d + n], MPI.BYTE], owner, target=(int(run_src[r]), n, MPI.BYTE))
            self._win.Unlock(owner)  # the Gets are complete once this returns
        return _gather(self.fields, recv_U8, dst_U[:-1][inverse_K], self.natoms[idx_K])

    def free(self) -> None:
        """Collective: releases the window on every rank of `comm`. Idempotent on each rank."""
        if self._win is not None:
            self._local_U8 = np.zeros(0, dtype=np.uint8)  # drop the view before the memory goes
            self._win.Free()
            self._win = None

    def __enter__(self) -> "SampleStore":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        # Free only on a clean exit: a rank unwinding an exception must not wait in a collective
        # the others never reach; the job aborts (MPI_Abort in the CLI) and MPI reclaims the window.
        if exc_type is None:
            self.free()

    def __repr__(self) -> str:
        state = "freed" if self._win is None else f"{self.local_nbytes} local bytes"
        return f"SampleStore({self.n_structures} structures on {self.world} ranks, {state})"


# -- layout ---------------------------------------------------------------------------------------

def _describe(shard: Frames) -> tuple[tuple[Field, ...], str | None]:
    """The stored fields of one shard, or an error message (never raises: it must reach all ranks)."""
    fields = []
    try:
        n_atoms, n_structures = int(np.sum(shard.natoms_S)), len(shard.natoms_S)
        for f in dataclasses.fields(shard):
            value = getattr(shard, f.name)
            if value is None:
                continue
            per = f.name.rsplit("_", 1)[-1][:1]
            if "_" not in f.name or per not in ("N", "S"):
                return (), f"Frames field '{f.name}': no _N/_S shape suffix, cannot store it"
            value = np.asarray(value)
            if value.ndim == 0 or len(value) != (n_atoms if per == "N" else n_structures):
                return (), f"Frames field '{f.name}': shape {value.shape}, expected {'atoms' if per == 'N' else 'structures'} first"
            if value.dtype.hasobject or value.dtype.itemsize > ALIGN or ALIGN % value.dtype.itemsize:
                return (), f"Frames field '{f.name}': dtype {value.dtype} cannot be stored"
            fields.append(Field(f.name, per, value.dtype.str, tuple(value.shape[1:])))
    except Exception as err:  # noqa: BLE001 — anything here must reach the other ranks
        return (), f"shard is not a valid Frames: {type(err).__name__}: {err}"
    return tuple(fields), None


def _agree(gathered: list[tuple[int, np.ndarray, tuple[Field, ...], str | None]]) -> tuple[Field, ...]:
    """The common layout, or the same ValueError on every rank (all decide from the same gathered data)."""
    for rank, (_, _, _, error) in enumerate(gathered):
        if error is not None:
            raise ValueError(f"SampleStore: rank {rank}: {error}")
    expected_start = 0
    for rank, (start, natoms_S, _, _) in enumerate(gathered):
        if start != expected_start:
            raise ValueError(f"SampleStore: rank {rank} holds structures from {start}, expected "
                             f"{expected_start}: shards must be contiguous in rank order (shard_range)")
        expected_start += len(natoms_S)
    # Empty shards carry no data, so their optional fields (None or not) do not count.
    holders = [(rank, g[2]) for rank, g in enumerate(gathered) if len(g[1])] or [(0, gathered[0][2])]
    ref_rank, ref = holders[0]
    for rank, fields in holders[1:]:
        if fields != ref:
            only_ref, only_here = (sorted(f"{f.name} ({np.dtype(f.dtype)}, row {f.row})" for f in set(a) - set(b))
                                   for a, b in ((ref, fields), (fields, ref)))
            raise ValueError(f"SampleStore: shards disagree on the stored fields: only rank {ref_rank} has "
                             f"{only_ref or 'none'}, only rank {rank} has {only_here or 'none'}")
    return ref


def _record_sizes_SF(fields: tuple[Field, ...], natoms_S: np.ndarray) -> np.ndarray:
    """Padded bytes of each field of each structure's record."""
    sizes = np.empty((len(natoms_S), len(fields)), dtype=np.int64)
    for j, f in enumerate(fields):
        rows = natoms_S if f.per == "N" else 1
        raw = rows * (f.row_elems * f.itemsize)
        sizes[:, j] = -(-raw // ALIGN) * ALIGN
    return sizes


def _element_ranges(fields: tuple[Field, ...], record_S: np.ndarray, natoms_S: np.ndarray):
    """For each field: (field, flat element indices of its values in a byte buffer viewed as its dtype),
    given where each structure's record starts in that buffer (byte offsets, any order, repeats allowed)."""
    sizes_SF = _record_sizes_SF(fields, natoms_S)
    field_start_SF = record_S[:, None] + np.cumsum(sizes_SF, axis=1) - sizes_SF
    for j, f in enumerate(fields):
        count_S = (natoms_S if f.per == "N" else np.ones_like(natoms_S)) * f.row_elems
        first_S = field_start_SF[:, j] // f.itemsize
        # Concatenated ranges [first, first + count): arange minus a per-range shift.
        ends = np.cumsum(count_S)
        shift = np.repeat(ends - count_S - first_S, count_S)
        yield f, np.arange(int(ends[-1]) if len(ends) else 0, dtype=np.int64) - shift


def _scatter(fields: tuple[Field, ...], shard: Frames, buf_U8: np.ndarray,
             record_S: np.ndarray, natoms_S: np.ndarray) -> None:
    """Packs the shard's columns into records at byte offsets record_S of buf_U8."""
    if not len(record_S):
        return  # an empty shard may lack optional fields that the others store
    for f, where in _element_ranges(fields, record_S, natoms_S):
        buf_U8.view(f.dtype)[where] = np.asarray(getattr(shard, f.name), dtype=f.dtype).reshape(-1)


def _gather(fields: tuple[Field, ...], buf_U8: np.ndarray, record_K: np.ndarray, natoms_K: np.ndarray) -> Frames:
    """Unpacks the records at byte offsets record_K of buf_U8 into one Frames, in that order."""
    columns = {f.name: buf_U8.view(f.dtype)[where].reshape(-1, *f.row)
               for f, where in _element_ranges(fields, record_K, natoms_K)}
    return Frames(**columns)
