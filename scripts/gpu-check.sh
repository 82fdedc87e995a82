#!/usr/bin/env bash
# Issue 19's GPU checks, one short script (a few minutes) for a lent GPU machine:
#   scripts/gpu-wheels.sh                      # here, once: the dependencies the GPU image lacks
#   device run: bash scripts/gpu-check.sh      # with carry [".gpu-wheels"], timeout_s 600
# It runs under the image's python3 (CUDA PyTorch) with the carried wheels and the working tree's
# package, and prints one "CHECK <name>: PASS|FAIL <detail>" line per check at the end; the full
# output of each goes to $OUT (the device tool fetches it).
#   1. the device: what torch sees
#   2. tests/gpu: float64 energies, forces, stresses and parameter gradients on the GPU == the CPU's (1e-10)
#   3. bench step, base preset, dense cells, batch 8, on the GPU: atoms/s and peak device memory
#   4. training on 2 ranks sharing the GPU (comm.backend mpi: device tensors staged through host
#      memory), float64, 3 steps: losses == the same run on the CPU
#   5. with 2+ GPUs: the same through torch.distributed (NCCL), one GPU per rank
#   6. expert offload (issue 24): moe-100m, one rank, float32, 6 steps with every expert on the GPU and
#      with parallel.resident_experts = 1 (experts in pinned host memory): median step time, device peak
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-$(mktemp -d)}"
PY="${PYTHON:-python3}"
work="$(mktemp -d)"
summary=()
check() { summary+=("CHECK $1: $2"); echo "CHECK $1: $2"; }

# ---- dependencies and the package (app/ is installed as exaforce, with io, perf, jobscripts inside)
if [[ -d .gpu-wheels ]]; then
  "$PY" -m pip install --quiet --no-deps --no-index --target "$work/site" .gpu-wheels/*.whl >"$OUT/pip.txt" 2>&1 \
    || { echo "pip install of .gpu-wheels failed:"; tail -5 "$OUT/pip.txt"; }
fi
mkdir -p "$work/pkg/exaforce"
cp -r app/. "$work/pkg/exaforce/"
cp -r io perf jobscripts "$work/pkg/exaforce/"
export PYTHONPATH="$work/pkg:$work/site${PYTHONPATH:+:$PYTHONPATH}" PATH="$work/site/bin:$PATH" OMP_NUM_THREADS=4
EXAFORCE=("$PY" -m exaforce.cli)

# ---- 1. the device
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/device.txt" 2>&1
"$PY" - >>"$OUT/device.txt" 2>&1 <<'PYEOF'
import torch
from exaforce.device import choose_device, describe
print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count())
print("run.device auto ->", describe(choose_device("auto")))
PYEOF
if grep -q "auto -> cuda" "$OUT/device.txt"; then check device "PASS $(tail -1 "$OUT/device.txt")"
else check device "FAIL $(tail -3 "$OUT/device.txt" | tr '\n' ' ')"; fi
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)

# ---- 2. float64 GPU == CPU
if "$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/gpu >"$OUT/tests-gpu.txt" 2>&1; then verdict=PASS
else verdict=FAIL; fi
check gpu-equals-cpu "$verdict $(tail -1 "$OUT/tests-gpu.txt")"

# ---- 3. bench step on the GPU
timeout 240 "${EXAFORCE[@]}" bench step --preset base --workload dense --batch 8 --device cuda --warmup 2 \
  --repeats 5 --json >"$OUT/bench-step.txt" 2>&1
if "$PY" - "$OUT/bench-step.txt" >"$OUT/bench-step-line.txt" 2>&1 <<'PYEOF'
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
row = [b for b in r["batches"] if not b.get("oom")][-1]
print(f"base, dense, batch {row['structures']} ({row['atoms']} atoms), float32: {row['atoms_per_s']:.0f} atoms/s, "
      f"{row['step_s'] * 1e3:.1f} ms/step, device peak {row.get('device_peak_mem_bytes', 0) / 2**30:.2f} GiB, "
      f"host peak {row['peak_rss_bytes'] / 2**30:.2f} GiB")
PYEOF
then verdict=PASS; else verdict=FAIL; fi
check bench-step "$verdict $(tail -1 "$OUT/bench-step-line.txt")"

# ---- 4./5. two ranks: CPU reference, then the GPU (mpi staging; nccl with 2+ GPUs)
data="$work/data"; mkdir -p "$data"
"${EXAFORCE[@]}" data synth --out "$data/emt.extxyz" --structures 16 --seed 3 >"$OUT/data.txt" 2>&1 &&
  "${EXAFORCE[@]}" data convert "$data/emt.extxyz" --out "$data/emt.bp" --name emt >>"$OUT/data.txt" 2>&1
cat >"$data/run.toml" <<EOF
[run]
steps = 3
dtype = "float64"
checkpoint_every = 0
[model]
preset = "small"
[data]
train = ["$data/emt.bp"]
global_batch_size = 4
EOF
train_losses() {  # $1 name, then --set values; prints the perf log's per-step losses
  local name=$1; shift
  timeout 180 mpiexec -n 2 "${EXAFORCE[@]}" train --config "$data/run.toml" --out-dir "$work/$name" "$@" \
    >"$OUT/train-$name.txt" 2>&1 || return 1
  "$PY" -c "import json,sys; print(' '.join(repr(json.loads(l)['loss']) for l in open(sys.argv[1]) if '\"step\"' in l))" \
    "$work/$name/perf/rank-00000.jsonl"
}
compare() {  # $1 name, $2 losses, $3 reference losses
  "$PY" -c "import sys; a, b = (list(map(float, s.split())) for s in sys.argv[1:3]); \
print('PASS' if a and len(a) == len(b) and all(abs(x - y) <= 1e-10 * abs(y) for x, y in zip(a, b)) else 'FAIL', a, b)" "$2" "$3"
}
ref=$(train_losses cpu --set 'run.device="cpu"') || ref=""
check train-cpu-reference "$([[ -n $ref ]] && echo "PASS losses $ref" || echo "FAIL $(tail -2 "$OUT/train-cpu.txt" | tr '\n' ' ')")"
if gpu=$(train_losses gpu-mpi --set 'run.device="cuda"'); then check train-2-ranks-mpi-staged "$(compare gpu "$gpu" "$ref")"
else check train-2-ranks-mpi-staged "FAIL $(tail -2 "$OUT/train-gpu-mpi.txt" | tr '\n' ' ')"; fi
if [[ $GPUS -ge 2 ]]; then
  if gpu=$(train_losses gpu-nccl --set 'run.device="cuda"' --set 'comm.backend="torch"'); then
    check train-2-ranks-nccl "$(compare gpu "$gpu" "$ref")"
  else check train-2-ranks-nccl "FAIL $(tail -2 "$OUT/train-gpu-nccl.txt" | tr '\n' ' ')"; fi
else
  check train-2-ranks-nccl "SKIPPED: $GPUS GPU(s) (NCCL needs one GPU per rank)"
fi

# ---- 6. expert offload: step time and device peak with and without
offload_run() {  # $1 name, then --set values; prints "median step ms, device peak GiB, fetched MiB/step"
  local name=$1; shift
  timeout 240 "${EXAFORCE[@]}" train --config "$data/run.toml" --out-dir "$work/$name" --set 'run.device="cuda"' \
    --set 'run.dtype="float32"' --set 'model.preset="moe-100m"' --set run.steps=6 --set data.global_batch_size=4 \
    "$@" >"$OUT/train-$name.txt" 2>&1 || return 1
  "$PY" - "$work/$name/perf/rank-00000.jsonl" <<'PYEOF'
import json, statistics, sys
steps = [json.loads(l) for l in open(sys.argv[1]) if '"kind":"step"' in l][2:]
print(f"{statistics.median(r['total_time'] for r in steps) * 1e3:.0f} ms/step, device peak "
      f"{max(r.get('device_peak_mem_bytes', 0) for r in steps) / 2**30:.2f} GiB, fetched "
      f"{statistics.median(r.get('offload_fetched_bytes', 0) for r in steps) / 2**20:.1f} MiB/step")
PYEOF
}
if resident=$(offload_run offload-none) && offloaded=$(offload_run offload-1 --set parallel.resident_experts=1); then
  check expert-offload "PASS resident: $resident; offloaded (1 per layer): $offloaded"
else check expert-offload "FAIL $(tail -2 "$OUT/train-offload-1.txt" "$OUT/train-offload-none.txt" | tr '\n' ' ')"; fi

echo; echo "==== summary"; printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
