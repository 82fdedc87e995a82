#!/usr/bin/env bash
# Aurora (ALCF): 6× Intel Data Center GPU Max 1550 per node = 12 tiles, Slingshot-11, Aurora MPICH.
# ALCF's `frameworks` module ships PyTorch with XPU support (intel-extension-for-pytorch),
# oneCCL bindings (torch.distributed backend "ccl"/"xccl"), mpi4py built against Aurora MPICH and
# Intel's Horovod build with oneCCL GPU operations; exaforce installs on top of it.
#   bash envs/aurora/setup.sh [VENV_DIR]     (run once on a login node)
# Not runnable on a workstation: module names follow the ALCF user guide.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${1:-$root/.venv-aurora}"

module load frameworks
python3 -m venv --system-site-packages "$venv"   # keep the module's torch/IPEX/oneCCL/mpi4py/horovod
# shellcheck disable=SC1091  # the venv is created just above
source "$venv/bin/activate"
pip install -r "$root/envs/aurora/requirements.txt"
# If the module lacks Horovod, Intel's build (intel-optimization-for-horovod) takes these flags:
#   HOROVOD_GPU=DPCPP HOROVOD_GPU_OPERATIONS=CCL HOROVOD_CPU_OPERATIONS=CCL HOROVOD_WITH_MPI=1 \
#   HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 CXX=icpx \
#   pip install --no-build-isolation --no-deps intel-optimization-for-horovod
pip install --no-build-isolation --no-deps -e "$root"
python -c "import torch, intel_extension_for_pytorch, mpi4py; print('torch', torch.__version__, 'xpu', torch.xpu.is_available())"

# At run time (the PBS template sets these): one rank per GPU tile, oneCCL over Slingshot.
#   export ZE_FLAT_DEVICE_HIERARCHY=FLAT CCL_PROCESS_LAUNCHER=pmix CCL_ATL_TRANSPORT=mpi FI_PROVIDER=cxi
