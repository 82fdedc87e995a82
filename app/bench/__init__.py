"""Benchmarks that run production code: the training step, training runs, readers, inference, MD.

`exaforce.bench.commands` is the table the CLI reads; each benchmark lives in its own module and
starts its subprocesses through `exaforce.bench.launcher`.
"""

BENCH_SEED = 0  # every benchmark's structures (bench.workloads: dense cells, or `data synth`'s) and models are seeded by it
