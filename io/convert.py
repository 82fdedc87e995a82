"""Source files (extxyz, ASE db, HDF5) to BP5 datasets, one file per rank at a time, all or nothing.

One input becomes the dataset OUT. Several become OUT/<stem>.bp, converted round-robin over the
ranks of `comm` into a hidden sibling folder that rank 0 renames to OUT only once every rank has
reported success: a failure anywhere leaves no OUT and no partial dataset. Every rank returns the
same verdict (habit 11: ranks agree before they act), so every rank exits with the same status.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from exaforce.io.atomic import DiskFullError, fsync_dir, remove, replace_path, sibling
from exaforce.io.bp import is_dataset, write_bp
from exaforce.io.schema import DataError, Frames, LabelKeys

FORMATS = {".xyz": "extxyz", ".extxyz": "extxyz", ".db": "ase.db", ".aselmdb": "aselmdb", ".h5": "hdf5",
           ".hdf5": "hdf5"}
Progress = Callable[[int, int], None]  # (structures read, structures in the file)


def _no_progress(done: int, total: int) -> None:
    pass


def read_source(path: Path, keys: LabelKeys | None = None,
                progress: Progress = _no_progress) -> tuple[Frames, dict[str, str]]:
    """Frames and metadata ({"name", "method"} where the format stores them) of one source file, by
    suffix; `keys` name the labels in extxyz and ASE databases (HDF5 has fixed names: io/SCHEMA.md).
    `progress` hears of every structure read (HDF5 reads its arrays whole: no progress)."""
    kind = FORMATS.get(path.suffix.lower())
    if kind == "extxyz":
        from exaforce.io.extxyz import read_extxyz

        return read_extxyz(path, keys, progress), {}
    if kind in ("ase.db", "aselmdb"):
        from exaforce.io.asedb import read_asedb

        return read_asedb(path, keys, progress, backend="db" if kind == "ase.db" else "aselmdb")
    if kind == "hdf5":
        from exaforce.io.hdf5 import read_hdf5

        if keys is not None and keys != LabelKeys():
            raise DataError(path, "--energy-key/--forces-key/--stress-key apply to extxyz and ASE databases; "
                                  "HDF5 files have fixed dataset names (io/SCHEMA.md)")

        return read_hdf5(path)
    raise DataError(path, f"unknown input format {path.suffix or '(no suffix)'!r}: expected one of "
                    f"{', '.join(FORMATS)}")


@dataclass(frozen=True)
class Converted:
    """One dataset written: where from, where to, how big, which fidelity."""

    source: Path
    out: Path
    n_structures: int
    n_atoms: int
    method: str


@dataclass
class Outcome:
    """What this rank converted (at the paths they get once published) and what failed on it;
    `n_failed` counts failures on every rank."""

    converted: list[Converted] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    n_failed: int = 0


def convert_file(source: Path, out: Path, name: str, method: str | None, overwrite: bool = False,
                 keys: LabelKeys | None = None, progress: Progress = _no_progress) -> Converted:
    """One source → one BP5 dataset (atomic); `method` None takes the source's own, else "unknown"."""
    frames, meta = read_source(source, keys, progress)
    method = method or meta.get("method") or "unknown"
    write_bp(frames, out, name, attrs={"source": str(source)}, method=method, overwrite=overwrite)
    return Converted(source, out, len(frames), frames.n_atoms, method)


def convert(sources: list[Path], out: Path, name: str, method: str | None = None, overwrite: bool = False,
            comm: Any = None, log: Callable[[Converted], None] = lambda done: None,
            keys: LabelKeys | None = None,
            progress: Callable[[Path], Progress] = lambda source: _no_progress) -> Outcome:
    """Convert `sources` (see the module docstring); `comm` is an mpi4py communicator or None (one process);
    `progress(source)` gives the callback that hears of each structure read from `source` on this rank.

    Bad arguments (unknown suffix, two inputs with one stem, OUT in the way) raise the same
    DataError on every rank before any work. A failure converting a source is caught, kept in
    `failures` on the rank that met it, and makes every rank's `n_failed` non-zero.
    """
    comm = comm if comm is not None else _Solo()
    rank, size = comm.Get_rank(), comm.Get_size()
    single = len(sources) == 1
    # Rank 0 checks the arguments and makes the temp folder; the bcast hands every rank one answer
    # and holds them until the folder exists.
    plan: tuple[tuple[str, str] | None, Path | None] = (None, None)
    if rank == 0:
        try:
            _check_arguments(sources, out, overwrite)
            if not single:
                plan = (None, sibling(out, "tmp"))
                plan[1].mkdir()
        except DataError as err:
            plan = ((err.path, err.message), None)
        except OSError as err:
            plan = ((str(out), f"cannot create the output folder: {err}"), None)
    error, tmp = comm.bcast(plan, root=0)
    if error is not None:
        raise DataError(*error)

    outcome = Outcome()
    for source in sources[rank::size]:
        target = out if single else tmp / f"{source.stem}.bp"
        try:
            done = convert_file(source, target, name, method, overwrite=single and overwrite, keys=keys,
                                progress=progress(source))
            outcome.converted.append(replace(done, out=out / target.name if tmp is not None else out))
            log(outcome.converted[-1])
        except Exception as err:  # noqa: BLE001 — any failure must reach the vote below, or the others hang
            message = str(err) if isinstance(err, (DataError, DiskFullError)) else \
                f"{source}: {type(err).__name__}: {err}"
            outcome.failures.append(message)
    outcome.n_failed = comm.allreduce(len(outcome.failures))  # collective: every rank votes, also with no work
    if tmp is not None:
        _publish_or_discard(comm, tmp, out, outcome)
    return outcome


def _check_arguments(sources: list[Path], out: Path, overwrite: bool) -> None:
    """Refuse, before any work, what would fail late or destroy something that is not ours."""
    if not sources:
        raise DataError(out, "no input files")
    if not out.parent.is_dir():
        raise DataError(out, f"parent folder {out.parent} does not exist")
    for source in sources:
        if source.suffix.lower() not in FORMATS:
            raise DataError(source, f"unknown input format {source.suffix or '(no suffix)'!r}: expected one of "
                            f"{', '.join(FORMATS)}")
    stems = [s.stem for s in sources]
    clash = sorted({s for s in stems if stems.count(s) > 1})
    if len(sources) > 1 and clash:
        raise DataError(out, f"inputs share the stem(s) {clash}: each input becomes OUT/<stem>.bp")
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise DataError(out, "already exists (pass --overwrite to replace it)")
    # --overwrite replaces a dataset, or a folder of datasets; never anything else.
    is_folder_of_datasets = out.is_dir() and all(p.suffix == ".bp" and is_dataset(p) for p in out.iterdir())
    if not (is_dataset(out) if len(sources) == 1 else is_folder_of_datasets and not is_dataset(out)):
        what = "a BP5 dataset" if len(sources) == 1 else "a folder holding only *.bp datasets"
        raise DataError(out, f"exists and is not {what}; refusing to replace it")


def _publish_or_discard(comm: Any, tmp: Path, out: Path, outcome: Outcome) -> None:
    """Rank 0 renames the finished folder to `out` if nobody failed, else deletes it; all learn the result.

    Each dataset inside was fsynced by write_bp; the folder's own entries are synced before the rename.
    """
    if comm.Get_rank() == 0:
        try:
            if outcome.n_failed:
                remove(tmp)
            else:
                fsync_dir(tmp)
                replace_path(tmp, out)
        except OSError as err:
            remove(tmp)
            outcome.failures.append(f"{out}: could not publish the converted datasets: {err}")
            outcome.n_failed += 1
    outcome.n_failed = comm.bcast(outcome.n_failed, root=0)


class _Solo:
    """The one-process stand-in for a communicator (so the algorithm has a single code path)."""

    def Get_rank(self) -> int:  # noqa: N802 — mpi4py's names
        return 0

    def Get_size(self) -> int:  # noqa: N802
        return 1

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def allreduce(self, value: int) -> int:
        return value

