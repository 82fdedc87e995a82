#!/usr/bin/env bash
# The billion-parameter preset trained for real (issue 24; README "The billion-parameter preset"):
# the demo's three fidelities (`make demo` makes them) plus 96 dense 32-108-atom EMT cells (made here
# if absent), then moe-1b with ep = 4 on 4 ranks (configs/moe1b.toml) and its report.
# About 30 minutes on the 2-core VM; each rank peaks near 5.6 GiB: run nothing else beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
out=demo
for name in emt gfn2 gfn1; do
  if [[ ! -d "$out/$name.bp" ]]; then
    echo "scripts/moe1b.sh: $out/$name.bp is missing: run 'make demo' first (it makes the demo's datasets)" >&2
    exit 1
  fi
done
if [[ ! -d "$out/dense.bp" ]]; then
  exaforce data synth --source dense-metals --out "$out/dense.extxyz" --structures 96 --seed 3
  exaforce data convert "$out/dense.extxyz" --out "$out/dense.bp" --name emt-dense --method EMT --overwrite
fi

rm -rf "$out/moe1b"
mpiexec -n 4 exaforce train --config configs/moe1b.toml
exaforce perf report "$out/moe1b"
