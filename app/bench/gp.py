"""`exaforce bench gp`: one large structure's training step with its atoms split over 1, 2, 4 … ranks.

The structure: a dense fcc Cu–Au alloy supercell of about --atoms atoms (25 % Au, rattled 0.1 Å,
random labels: the loss's value does not change the work), cubic or a rod (--shape). Every run takes
the fused training path (the one large structures take). Per GP size one `mpiexec -n gp` worker
runs the trainer's own `train_step` (parallel.gp = gp, every structure split) and reports per rank:
the median step time, the true peak RSS from the process start and the RSS before any step, the
rank's owned atoms and its subgraph (atoms, bonds, triplets: owned and halo), and the seconds of
the GP group's Allreduce and of the gradient reduction. One-rank runs at --single-atoms sizes give
the memory and time per atom, projected to --atoms (the structure need not fit one rank).

Halo (--halo, both by default, each GP size run with each): "ghost" computes the ghosts out to the
receptive field redundantly — the report gives the work factor Σ_ranks subgraph bonds / the
structure's bonds; "exchange" keeps one hop of halo and refreshes it from its owners twice per block —
the report gives the rows and bytes each rank receives per exchange (bonds after every block, atoms
between blocks; each backward moves as much again) and the seconds spent in those all-to-alls.

On a machine with fewer cores than ranks the ranks share cores: step times then mix in contention
(the output says how many cores there were); memory per rank does not.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Callable

from exaforce.bench.step import START_RSS_BYTES, _vm_rss_bytes  # noqa: F401  (first: the start RSS)

Log = Callable[[str], None]


ROD_SIDE = 4  # cubic fcc cells across a rod (14.8 Å): the rest of the atoms go along it


def large_cell(atoms: int, shape: str, seed: int):
    """A dense fcc alloy supercell (25 % Au) of about `atoms` atoms: as cubic as the count allows, or a
    rod ROD_SIDE × ROD_SIDE cells across (an interface or grain-boundary cell's shape: long one way)."""
    import numpy as np
    from ase.build import bulk
    from ase.calculators.singlepoint import SinglePointCalculator

    side = ROD_SIDE if shape == "rod" else max(1, int((atoms / 4) ** (1 / 3)))
    repeats = (side, side, max(1, round(atoms / (4 * side * side))))
    cell = bulk("Cu", "fcc", a=3.7, cubic=True).repeat(repeats)
    rng = np.random.default_rng(seed)
    cell.numbers[rng.random(len(cell)) < 0.25] = 79
    cell.rattle(0.1, seed=seed)
    cell.calc = SinglePointCalculator(cell, energy=-3.5 * len(cell), forces=rng.normal(size=(len(cell), 3)) * 0.3,
                                      stress=rng.normal(size=6) * 0.01)
    return cell


def gp_worker(gp: int, atoms: int, shape: str, preset: str, dtype: str, warmup: int, repeats: int, halo: str) -> None:
    """One GP size on gp ranks; rank 0 prints the JSON record."""
    import numpy as np
    import torch

    from exaforce.bench import BENCH_SEED
    from exaforce.comm.groups import build_groups
    from exaforce.config import DTYPES, Config, DataConfig, ParallelConfig, RunConfig, model_preset
    from exaforce.graph import build_batch
    from exaforce.io.schema import Frames
    from exaforce.model.potential import Potential
    from exaforce.parallel.parallelize import parallelize
    from exaforce.parallel.topology import Topology
    from exaforce.training.progress import peak_memory_bytes
    from exaforce.training.schedule import make_optimizer
    from exaforce.training.step import train_step

    # store_all_below = 0: every size on the fused path, the one large structures train on (a small
    # subgraph would otherwise store everything: faster, but another memory per atom)
    cfg = Config(run=RunConfig(steps=warmup + repeats, dtype=dtype, store_all_below=0), model=model_preset(preset),
                 data=DataConfig(train=("bench",), global_batch_size=1),
                 parallel=ParallelConfig(gp=gp, gp_min_atoms=0, gp_halo=halo))
    topo = Topology.from_mpi(gp=gp)
    torch.manual_seed(BENCH_SEED)
    model = Potential(cfg.model).to(dtype=DTYPES[dtype])
    parallel = parallelize(model, topo, build_groups("mpi", topo), cfg)
    optimizer, lr_schedule = make_optimizer(model, cfg)
    t0 = time.perf_counter()
    batch = build_batch(Frames.from_atoms([large_cell(atoms, shape, BENCH_SEED)]), model.species_table(), cfg.model.cutoff,
                        cfg.model.three_body_cutoff).to("cpu", DTYPES[dtype])
    graph_s = time.perf_counter() - t0
    baseline = _vm_rss_bytes()  # nothing has stepped yet
    seconds, gp_sum, gp_halo, comm = [], [], [], []
    for step in range(1, warmup + repeats + 1):
        topo.barrier()
        t0 = time.perf_counter()
        result = train_step(model, [batch], optimizer, parallel, cfg, 1.0, lr_schedule.lr_at(step))
        seconds.append(time.perf_counter() - t0)
        gp_sum.append(result.times.get("gp_sum", 0.0))
        gp_halo.append(result.times.get("gp_halo", 0.0))
        comm.append(result.times["comm"])
    peak = peak_memory_bytes()
    row = {"rank": topo.rank, "step_s": statistics.median(seconds[warmup:]), "gp_sum_s": statistics.median(gp_sum[warmup:]),
           "gp_halo_s": statistics.median(gp_halo[warmup:]),
           "reduce_s": statistics.median(comm[warmup:]), "baseline_rss_bytes": baseline, "peak_rss_bytes": peak,
           "graph_s": graph_s, "work": result.work or {**batch.counts(), "owned_atoms": int(batch.numbers_N.shape[0])}}
    part = parallel.graph.shard(batch) if parallel.graph is not None else None
    if part is not None and part.halo is not None:  # rows received per exchange (HaloPlan.volume)
        rows = part.halo.volume()
        row["halo_rows_per_exchange"] = rows
        row["halo_bytes_per_exchange"] = sum(rows.values()) * cfg.model.width * DTYPES[dtype].itemsize
    rows = topo.gather_to_root(row)
    if topo.is_root:
        print(json.dumps({"gp": gp, "atoms": int(batch.numbers_N.shape[0]), "edges": int(batch.edge_index_2E.shape[1]),
                          "angles": int(batch.triplet_index_2T.shape[1]), "ranks": rows}))


def bench_gp(atoms: int, shape: str, sizes: list[int], single_atoms: list[int], preset: str, dtype: str, warmup: int,
             repeats: int, budget_gib: float, log: Log, halos: tuple[str, ...] = ("ghost", "exchange")) -> dict:
    from exaforce.bench.launcher import environment, launch_json, module_command, on_ranks

    env = environment(OMP_NUM_THREADS="1")
    results: dict = {"preset": preset, "dtype": dtype, "atoms": atoms, "shape": shape, "warmup": warmup, "repeats": repeats,
                     "cores": os.cpu_count(), "threads_per_rank": env["OMP_NUM_THREADS"], "budget_gib": budget_gib,
                     "halos": list(halos),
                     "single": [], "split": []}

    def run(gp: int, n: int, halo: str = "ghost") -> dict:
        log(f"bench gp: {n} atoms on {gp} rank(s)" + (f", halo {halo}" if gp > 1 else "") + " ...")
        record = launch_json(on_ranks(gp, module_command("exaforce.bench.gp", str(gp), str(n), shape, preset, dtype,
                                                         str(warmup), str(repeats), halo)),
                             f"bench gp worker ({gp} ranks, {n} atoms, halo {halo})", env)
        record["halo"] = halo
        ranks = record["ranks"]
        record["step_s"] = max(r["step_s"] for r in ranks)
        record["peak_gib_per_rank"] = [r["peak_rss_bytes"] / 2**30 for r in ranks]
        record["step_mem_gib_per_rank"] = [(r["peak_rss_bytes"] - r["baseline_rss_bytes"]) / 2**30 for r in ranks]
        record["bond_work_factor"] = sum(r["work"]["edges"] for r in ranks) / record["edges"]
        record["comm_share"] = max((r["gp_sum_s"] + r["gp_halo_s"] + r["reduce_s"]) / r["step_s"] for r in ranks)
        log(f"  {record['atoms']} atoms, {record['edges']} bonds, {record['angles']} triplets: step {record['step_s']:.2f} s, "
            f"peak RSS per rank {', '.join(f'{g:.2f}' for g in record['peak_gib_per_rank'])} GiB "
            f"(step's own {', '.join(f'{g:.2f}' for g in record['step_mem_gib_per_rank'])})")
        if gp > 1:
            for r in ranks:
                w = r["work"]
                exchange = "" if "halo_rows_per_exchange" not in r else (
                    f"; halo exchange {r['gp_halo_s']:.3f} s, per exchange {r['halo_rows_per_exchange']['halo_atoms']} "
                    f"atoms + {r['halo_rows_per_exchange']['halo_bonds']} bonds received "
                    f"({r['halo_bytes_per_exchange'] / 2**20:.2f} MiB)")
                log(f"    rank {r['rank']}: owns {w['owned_atoms']} atoms; subgraph {w['atoms']} atoms, {w['edges']} bonds, "
                    f"{w['angles']} triplets; GP sum {r['gp_sum_s']:.3f} s, gradient reduction {r['reduce_s']:.3f} s"
                    f"{exchange}")
            log(f"    halo work: {record['bond_work_factor']:.2f}× the structure's bonds computed over the group; "
                f"communication {record['comm_share']:.1%} of the step (worst rank)")
        return record

    for n in single_atoms:
        results["single"].append(run(1, n))
    if len(results["single"]) >= 2:  # peak RSS and step time linear in the atoms: projected to --atoms
        import numpy as np

        x = [r["atoms"] for r in results["single"]]
        slope_mem, base_mem = np.polyfit(x, [r["peak_gib_per_rank"][0] for r in results["single"]], 1)
        slope_s, base_s = np.polyfit(x, [r["step_s"] for r in results["single"]], 1)
        results["single_projection"] = {"gib_per_atom": slope_mem, "gib_at_zero": base_mem,
                                        "s_per_atom": slope_s, "s_at_zero": base_s}
    for gp, halo in [(gp, halo) for gp in sizes for halo in (halos if gp > 1 else ("ghost",))]:
        record = run(gp, atoms, halo)
        results["split"].append(record)
        projection = results.get("single_projection")
        if projection:
            peak = projection["gib_at_zero"] + projection["gib_per_atom"] * record["atoms"]
            step = projection["s_at_zero"] + projection["s_per_atom"] * record["atoms"]
            record["projected_single_rank"] = {"peak_gib": peak, "step_s": step}
            verdict = "" if not budget_gib else (f"; budget {budget_gib:g} GiB per rank: one rank "
                                                 f"{'would not fit' if peak > budget_gib else 'fits'}, {gp} rank(s) "
                                                 f"{'fit' if max(record['peak_gib_per_rank']) <= budget_gib else 'do not fit'}")
            log(f"  one rank would need about {peak:.2f} GiB and {step:.1f} s for {record['atoms']} atoms "
                f"(linear in the atoms, from {', '.join(str(r['atoms']) for r in results['single'])}){verdict}")
    return results


if __name__ == "__main__":  # worker: gp atoms shape preset dtype warmup repeats halo
    gp_size, n_atoms, cell_shape, preset_name, dt, w, r, halo_mode = sys.argv[1:9]
    gp_worker(int(gp_size), int(n_atoms), cell_shape, preset_name, dt, int(w), int(r), halo_mode)
