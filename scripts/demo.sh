#!/usr/bin/env bash
# The main job on the bundled default: synth → convert → stage → 2-rank training → report.
# Run through `make demo` (which sets up .venv first). Override sizes with DEMO_STRUCTURES / DEMO_STEPS.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # 2 ranks on 2 cores: one thread each
structures="${DEMO_STRUCTURES:-400}"
stage_dir="${EXAFORCE_STAGE_DIR:-${TMPDIR:-/tmp}/exaforce-stage-$(id -un)}"
out=demo
mkdir -p "$out"
t0=$SECONDS
step() { printf '\n== [%4ds] %s\n' $((SECONDS - t0)) "$*"; }

step "1/5 synthesise $structures EMT-labelled metal structures"
exaforce data synth --out "$out/emt.extxyz" --structures "$structures" --seed 0

step "2/5 convert extxyz → ADIOS2 BP5"
exaforce data convert "$out/emt.extxyz" --out "$out/emt.bp" --name emt-metals --overwrite

step "3/5 stage to node-local storage ($stage_dir), 2 ranks"
mpiexec -n 2 exaforce stage "$out/emt.bp" --to "$stage_dir"

step "4/5 train on 2 ranks (configs/demo.toml)"
sed -e "s#^train = .*#train = [\"$stage_dir/emt.bp\"]#" \
    -e "s#^out_dir = .*#out_dir = \"$(pwd)/$out/run\"#" configs/demo.toml > "$out/train.toml"
rm -rf "$out/run"
mpiexec -n 2 exaforce train --config "$out/train.toml" ${DEMO_STEPS:+--steps "$DEMO_STEPS"}

step "5/5 performance report"
exaforce perf report "$out/run"
printf '\ndemo finished in %d s; report: %s\n' $((SECONDS - t0)) "$(pwd)/$out/run/report/report.md"
