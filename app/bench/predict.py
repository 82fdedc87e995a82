"""`exaforce bench predict`: inference throughput of `exaforce predict` on 1, 2, … ranks, and of the
MatRIS reference model (PyPI `matris`, random weights at the preset's width and depth) on the same
structures, batch size and threads.

Both sides do the same work per batch: build the graphs (exaforce: vesin + NumPy line graph;
MatRIS: its own converter on pymatgen Structures, made once beforehand as its data sets hold
them), then energy, forces and stress by autograd without create_graph. exaforce's figure is the
slowest rank's predict loop (its BP5 read and check, graphs, model), without loading the model and
without the final gather and write. Medians over repeats; MatRIS after a warm-up batch (exaforce's
runs start cold).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from exaforce.bench import BENCH_SEED
from exaforce.bench.launcher import environment, exaforce_command, launch_json, module_command, on_ranks


def matris_worker(preset: str, structures: int, batch_size: int, dtype: str, repeats: int) -> dict:
    """Seconds (median over repeats) for MatRIS to predict E, F, S for all structures in batches."""
    from exaforce.config import model_preset
    from exaforce.io.synth import synthesize
    from exaforce.bench.reference import build_matris, matris_graphs, matris_param_count
    from pymatgen.io.ase import AseAtomsAdaptor

    cfg = model_preset(preset)
    atoms = synthesize(structures, seed=BENCH_SEED)
    torch_dtype = getattr(torch, dtype)
    model = build_matris(cfg.width, cfg.blocks, cfg.cutoff, cfg.three_body_cutoff, torch_dtype, seed=BENCH_SEED)
    model.eval().requires_grad_(False)
    pymatgen = [AseAtomsAdaptor.get_structure(a) for a in atoms]

    def run(stop: int = structures) -> tuple[float, float]:
        graph_s = model_s = 0.0
        for lo in range(0, stop, batch_size):
            t0 = time.perf_counter()
            graphs = matris_graphs(model, pymatgen[lo:lo + batch_size], atoms[lo:lo + batch_size], torch_dtype)
            t1 = time.perf_counter()
            pred = model(graphs, task="efs", is_training=False, mode="torch")  # forces/stress, no create_graph
            float(pred["e"].detach().sum())
            graph_s, model_s = graph_s + t1 - t0, model_s + time.perf_counter() - t1
        return graph_s, model_s

    run(stop=1)  # warm-up: the first batch
    runs = [run() for _ in range(repeats)]
    total = statistics.median(g + m for g, m in runs)
    return {"model": "matris", "params": matris_param_count(model), "loop_s": total,
            "graph_s": statistics.median(g for g, _ in runs), "model_s": statistics.median(m for _, m in runs),
            "structures": structures, "atoms": sum(len(a) for a in atoms), "threads": torch.get_num_threads()}


def bench_predict(preset: str, structures: int, ranks: list[int], batch_size: int, repeats: int, dtype: str,
                  compare: str | None, log: Callable[[str], None]) -> dict:
    from exaforce.io.bp import open_bp, write_bp
    from exaforce.io.schema import Frames
    from exaforce.io.synth import synthesize

    env = environment(OMP_NUM_THREADS="1")
    result: dict = {"preset": preset, "structures": structures, "batch_size": batch_size, "dtype": dtype,
                    "threads_per_rank": int(env["OMP_NUM_THREADS"]), "repeats": repeats, "exaforce": {},
                    "reference": None}
    with tempfile.TemporaryDirectory(prefix="exaforce-bench-predict-") as tmp:
        tmp = Path(tmp)
        log(f"bench predict: {structures} EMT structures (synth seed {BENCH_SEED}), preset {preset}, {dtype}, "
            f"batches of {batch_size}, {env['OMP_NUM_THREADS']} thread(s) per rank, median of {repeats}")
        atoms = synthesize(structures, seed=BENCH_SEED)
        write_bp(Frames.from_atoms(atoms), tmp / "d.bp", "bench", method="EMT")
        result["atoms"] = sum(len(a) for a in atoms)
        outputs = {}
        for r in ranks:
            runs = []
            for i in range(repeats):
                out = tmp / f"pred-{r}-{i}.bp"
                command = exaforce_command("predict", "--preset", preset, "--seed", str(BENCH_SEED), "--data",
                                           str(tmp / "d.bp"), "--out", str(out), "--batch-size", str(batch_size),
                                           "--dtype", dtype, "--json")
                runs.append(launch_json(on_ranks(r, command), f"bench predict: {r} rank(s)", env))
            outputs[r] = tmp / f"pred-{r}-0.bp"
            med = {k: statistics.median(run[k] for run in runs)
                   for k in ("loop_s", "graph_s", "model_s", "structures_per_s", "atoms_per_s")}
            every = [round(run["structures_per_s"], 2) for run in runs]
            result["exaforce"][str(r)] = {**med, "runs_structures_per_s": every}
            log(f"  exaforce predict, {r} rank(s): {med['structures_per_s']:8.1f} structures/s "
                f"{med['atoms_per_s']:9.0f} atoms/s  (slowest rank: graphs {med['graph_s']:.2f} s, "
                f"model {med['model_s']:.2f} s)")
        result["ranks_identical"] = _identical([outputs[r] for r in ranks], open_bp)
        log(f"  predictions identical on {', '.join(map(str, ranks))} rank(s): {result['ranks_identical']}")
    if compare:
        command = module_command("exaforce.bench.predict", compare, preset, str(structures), str(batch_size), dtype,
                                 str(repeats))
        ref = launch_json(command, f"bench predict: the {compare} worker", env)
        ref.update(structures_per_s=structures / ref["loop_s"], atoms_per_s=result["atoms"] / ref["loop_s"])
        result["reference"] = ref
        log(f"  {compare}, 1 process:      {ref['structures_per_s']:8.1f} structures/s {ref['atoms_per_s']:9.0f} "
            f"atoms/s  (graphs {ref['graph_s']:.2f} s, model {ref['model_s']:.2f} s; {ref['params']:,} params)")
        one = result["exaforce"][str(ranks[0])]
        log(f"  exaforce on {ranks[0]} rank(s) / {compare}: {one['atoms_per_s'] / ref['atoms_per_s']:.2f}x atoms/s "
            f"(model part alone {ref['model_s'] / one['model_s']:.2f}x)")
    return result


def _identical(paths: list[Path], open_bp) -> bool:
    """Bitwise equality of the predicted energies, forces and stresses of several outputs."""
    columns = []
    for path in paths:
        with open_bp(path) as d:
            f = d.read(0, d.n_structures)
            columns.append((f.energy_S, f.forces_N3, f.stress_S6))
    return all(np.array_equal(a, b, equal_nan=True) for other in columns[1:] for a, b in zip(columns[0], other))


if __name__ == "__main__":  # worker: model preset structures batch_size dtype repeats
    name, preset_name, n, b, dt, rep = sys.argv[1:7]
    if name != "matris":
        raise SystemExit(f"unknown reference model {name!r}")
    print(json.dumps(matris_worker(preset_name, int(n), int(b), dt, int(rep))))
