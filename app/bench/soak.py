"""`exaforce bench soak`: a long run must not grow.

Trains the small preset for many steps on R ranks through the real CLI (validation and checkpoints
included, as a production run has them) and follows each rank's resident memory (the perf log's
`rss_bytes`, after every step). Growth is measured from the end of the warm-up (allocator pools,
the first checkpoint's buffers and lazily built tables are filled by then) to the last step.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

from exaforce.bench import BENCH_SEED
from exaforce.bench.runs import TrainingRuns

MAX_GROWTH = 0.05  # what the issue allows after the warm-up: 5 %


def bench_soak(steps: int, ranks: int, every: int, warmup: int, log: Callable[[str], None]) -> dict:
    from exaforce.config import from_dict
    from exaforce.perf.runlog import load_run

    if not 0 < warmup < steps:
        raise ValueError(f"--warmup {warmup}: must be between 0 and --steps {steps}")
    with tempfile.TemporaryDirectory(prefix="exaforce-bench-soak-") as tmp:
        runs = TrainingRuns(Path(tmp), ranks, log)
        data = runs.dataset("soak", 200)
        cfg = from_dict({
            "run": {"steps": steps, "log_every": every, "val_every": every, "checkpoint_every": every,
                    "keep_checkpoints": 2, "seed": BENCH_SEED},
            "data": {"datasets": [{"path": str(data), "val_fraction": 0.1}], "global_batch_size": 2 * ranks},
            "model": {"preset": "small"},
        })
        log(f"bench soak: mpiexec -n {ranks} exaforce train, small preset, {steps} steps "
            f"(validation and a checkpoint every {every})")
        run = load_run(runs.train("soak", cfg))
    rss = {rank: {r["step"]: r["rss_bytes"] for r in records} for rank, records in run.steps.items()}
    table = {rank: {step: by_step[step] for step in sorted(by_step) if step % every == 0 or step == 1}
             for rank, by_step in rss.items()}
    growth = {rank: by_step[steps] / by_step[warmup] - 1 for rank, by_step in rss.items()}
    log(f"resident memory (MiB) per rank, every {every} steps:")
    log("   step  " + "  ".join(f"rank {rank:>3}" for rank in sorted(table)))
    for step in sorted(table[min(table)]):
        log(f"  {step:5d}  " + "  ".join(f"{table[rank][step] / 2**20:8.1f}" for rank in sorted(table)))
    for rank in sorted(growth):
        verdict = "ok" if growth[rank] <= MAX_GROWTH else f"GROWS more than {MAX_GROWTH:.0%}"
        log(f"rank {rank}: {rss[rank][warmup] / 2**20:.1f} MiB at step {warmup} → {rss[rank][steps] / 2**20:.1f} MiB "
            f"at step {steps}: {growth[rank]:+.2%} ({verdict})")
    return {"steps": steps, "ranks": ranks, "warmup": warmup, "every": every,
            "rss_mib": {str(rank): {str(step): round(v / 2**20, 2) for step, v in by_step.items()}
                        for rank, by_step in table.items()},
            "growth_after_warmup": {str(rank): g for rank, g in growth.items()},
            "ok": all(g <= MAX_GROWTH for g in growth.values())}
