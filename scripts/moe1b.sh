#!/usr/bin/env bash
# The billion-parameter preset trained for real (issue 24; README "The billion-parameter preset"):
# the demo's three fidelities (made here as `make demo` makes them, if absent) plus 96 dense
# 32-108-atom EMT cells, then moe-1b with ep = 4 on 4 ranks (configs/moe1b.toml) and its report.
# About 35 minutes on the 2-core VM; each rank peaks near 5.6 GiB: run nothing else beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
out=demo
mkdir -p "$out"

dataset() {  # name method synth-arguments...: synthesise and convert unless the dataset exists
  local name=$1 method=$2; shift 2
  [[ -d "$out/$name.bp" ]] && return
  exaforce data synth --out "$out/$name.extxyz" "$@"
  exaforce data convert "$out/$name.extxyz" --out "$out/$name.bp" --name "$name" --method "$method" --overwrite
}
dataset emt EMT --structures 400 --seed 0
dataset gfn2 GFN2-xTB --source molecules --method GFN2-xTB --structures 400 --seed 1
dataset gfn1 GFN1-xTB --source molecules --method GFN1-xTB --structures 200 --seed 2
dataset dense EMT --source dense-metals --structures 96 --seed 3

rm -rf "$out/moe1b"
mpiexec -n 4 exaforce train --config configs/moe1b.toml
exaforce perf report "$out/moe1b"
