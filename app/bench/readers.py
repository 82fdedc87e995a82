"""`exaforce bench io`: how fast a rank gets its share of a dataset, and how fast staging copies.

The same structures (`data synth`, EMT) as extxyz, BP5 and HDF5 (io/SCHEMA.md layout). Under
`mpiexec -n R`, each rank reads its contiguous share: BP5 by hyperslab (one selection per
variable), HDF5 by hyperslab through h5py, extxyz through ASE's parser (`ase.io.read` with an
index slice: it must scan the text up to its share). Throughput = all structures / the slowest
rank's time; MB/s counts the format's bytes on disk. Staging: `exaforce.io.stage` (copy + sha256
verify) against `cp -r` of the same dataset, into a fresh folder each time. Every file was just
written, so reads come from the page cache: these are parsing/decoding rates, not disk rates.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from exaforce.bench import BENCH_SEED
from exaforce.bench.launcher import launch_json, module_command, on_ranks


def _dir_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _read_share(fmt: str, path: Path, n: int, rank: int, world: int) -> int:
    """Reads this rank's contiguous share in one format; returns the structures read."""
    from exaforce.io.sampler import shard_range

    start, count = shard_range(n, rank, world)
    if fmt == "bp5":
        from exaforce.io.bp import open_bp

        with open_bp(path) as dataset:
            return len(dataset.read(start, count))
    if fmt == "hdf5":
        import h5py

        with h5py.File(path, "r") as fh:
            natoms, offsets = fh["natoms"][start:start + count], fh["offsets"][start:start + count]
            lo, hi = (int(offsets[0]), int(offsets[-1] + natoms[-1])) if count else (0, 0)
            for var in ("numbers", "positions", "forces"):
                fh[var][lo:hi]
            for var in ("cell", "pbc", "energy", "stress"):
                fh[var][start:start + count]
            return len(natoms)
    import ase.io

    return len(ase.io.read(path, index=slice(start, start + count), format="extxyz"))


def worker(fmt: str, path: str, n: int, repeats: int) -> None:
    """Run under mpiexec: rank 0 prints the median over repeats of the slowest rank's seconds."""
    from exaforce.parallel.topology import Topology

    topo = Topology.from_mpi()
    seconds = []
    for _ in range(repeats):
        topo.barrier()  # collective: every rank starts together
        t0 = time.perf_counter()
        got = _read_share(fmt, Path(path), n, topo.rank, topo.world_size)
        seconds.append(topo.max(time.perf_counter() - t0))  # collective: the slowest rank's time
        total = topo.sum(got)  # collective
        if total != n:
            raise RuntimeError(f"{fmt}: read {total} structures, expected {n}")
    if topo.is_root:
        print(json.dumps({"seconds": statistics.median(seconds)}))


def bench_io(structures: int, ranks: list[int], repeats: int, log: Callable[[str], None]) -> dict:
    from exaforce.io.bp import write_bp
    from exaforce.io.extxyz import write_extxyz
    from exaforce.io.hdf5 import write_hdf5
    from exaforce.io.schema import Frames
    from exaforce.io.stage import stage_datasets
    from exaforce.io.synth import synthesize

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per reader, whatever the user's setting
    results: dict = {"structures": structures, "repeats": repeats, "read": {}, "stage": {}}
    with tempfile.TemporaryDirectory(prefix="exaforce-bench-io-") as tmp:
        tmp = Path(tmp)
        log(f"bench io: synthesising {structures} EMT structures")
        frames = Frames.from_atoms(synthesize(structures, seed=BENCH_SEED))
        files = {"extxyz": tmp / "d.extxyz", "bp5": tmp / "d.bp", "hdf5": tmp / "d.h5"}
        write_extxyz(frames, files["extxyz"])
        write_bp(frames, files["bp5"], "bench", method="EMT")
        write_hdf5(frames, files["hdf5"], "bench", method="EMT")
        for fmt, path in files.items():
            mb = _dir_bytes(path) / 1e6
            for r in ranks:
                command = module_command("exaforce.bench.readers", fmt, str(path), str(structures), str(repeats))
                s = launch_json(on_ranks(r, command), f"bench io: {fmt} on {r} rank(s)", env)["seconds"]
                results["read"][f"{fmt}/{r}"] = {"seconds": s, "structures_per_s": structures / s,
                                                 "mb_per_s": mb / s, "mb": mb}
                log(f"  read {fmt:>6} on {r} rank(s): {structures / s:>10,.0f} structures/s  {mb / s:8.1f} MB/s "
                    f"({mb:.1f} MB, median of {repeats})")
        mb = _dir_bytes(files["bp5"]) / 1e6
        for name in ("exaforce stage", "cp -r"):
            seconds = []
            for i in range(repeats):
                dest = tmp / f"stage-{name.split()[0]}-{i}"
                t0 = time.perf_counter()
                if name == "cp -r":
                    dest.mkdir()
                    subprocess.run(["cp", "-r", str(files["bp5"]), str(dest)], check=True)
                else:
                    stage_datasets([files["bp5"]], dest, None, log=lambda m: None)
                seconds.append(time.perf_counter() - t0)
                shutil.rmtree(dest)
            s = statistics.median(seconds)
            results["stage"][name] = {"seconds": s, "mb_per_s": mb / s, "mb": mb}
            log(f"  stage {name:>14}: {mb / s:8.1f} MB/s ({mb:.1f} MB BP5 dataset, median of {repeats})")
    return results


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
