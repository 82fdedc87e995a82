#!/usr/bin/env bash
# Wheels that scripts/gpu-check.sh installs on a GPU machine whose image has CUDA PyTorch but not
# exaforce's other dependencies and no network: run here once, then carry .gpu-wheels (~34 MB).
# The lent machines' python3 is 3.12 (/work/.library/device/KINDS.md); PYVER overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu-wheels
python -m pip download --quiet --only-binary=:all: --no-deps --python-version "${PYVER:-3.12}" \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  -d .gpu-wheels ase vesin adios2 mpich mpi4py
ls -la .gpu-wheels
