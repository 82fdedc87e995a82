#!/usr/bin/env bash
# The main job on the bundled default: synth → convert → job script (stage + 2-rank training) → report.
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

step "1/5 synthesise: $structures EMT metals, $structures GFN2-xTB and $((structures / 2)) GFN1-xTB molecules (tblite)"
exaforce data synth --out "$out/emt.extxyz" --structures "$structures" --seed 0
exaforce data synth --source molecules --method GFN2-xTB --out "$out/gfn2.extxyz" --structures "$structures" --seed 1
exaforce data synth --source molecules --method GFN1-xTB --out "$out/gfn1.extxyz" --structures $((structures / 2)) --seed 2

step "2/5 convert extxyz → ADIOS2 BP5 (one dataset per fidelity)"
exaforce data convert "$out/emt.extxyz" --out "$out/emt.bp" --name emt-metals --method EMT --overwrite
exaforce data convert "$out/gfn2.extxyz" --out "$out/gfn2.bp" --name gfn2-molecules --method GFN2-xTB --overwrite
exaforce data convert "$out/gfn1.extxyz" --out "$out/gfn1.bp" --name gfn1-molecules --method GFN1-xTB --overwrite

step "3/5 render the job: exaforce jobs render --machine local (2 ranks) → $out/job.sh"
rm -rf "$out/run"
exaforce jobs render --machine local --ranks-per-node 2 --config configs/demo.toml --run-dir "$out/run" \
  --stage-dir "$stage_dir" ${DEMO_STEPS:+--set run.steps=$DEMO_STEPS} --out "$out/job.sh"

step "4/5 run it: stage to node-local storage ($stage_dir), train on 2 ranks (three datasets, three heads)"
bash "$out/job.sh"

step "5/5 predictions on each dataset (2 ranks, its own head) and the report: curves, validation, parity"
for name in emt gfn2 gfn1; do
  mpiexec -n 2 exaforce predict --checkpoint "$out/run" --data "$out/$name.bp" --head "$name" \
    --out "$out/run/predictions/$name.bp" --overwrite
done
exaforce perf report "$out/run"
printf '\ndemo finished in %d s; report: %s (one self-contained page: report.html)\n' $((SECONDS - t0)) "$(pwd)/$out/run/report/report.md"
