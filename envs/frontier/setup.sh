#!/usr/bin/env bash
# Frontier (OLCF): HPE Cray EX, 4× AMD MI250X per node = 8 GCDs, Slingshot-11, Cray MPICH.
# Creates a venv on top of the system Python with ROCm PyTorch, mpi4py built against Cray MPICH,
# and Horovod built for ROCm with RCCL GPU operations. Run once on a login node:
#   bash envs/frontier/setup.sh [VENV_DIR]      (default: $MEMBERWORK/<project>/exaforce-venv or ./.venv-frontier)
# Not runnable on a workstation: module names follow the OLCF user guide; adjust versions there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${1:-$root/.venv-frontier}"

module load PrgEnv-gnu
module load rocm/6.2.4
module load craype-accel-amd-gfx90a
module load cray-python
export MPICH_GPU_SUPPORT_ENABLED=1        # GPU-aware Cray MPICH (device buffers in MPI calls)

python3 -m venv "$venv"
# shellcheck disable=SC1091  # the venv is created just above
source "$venv/bin/activate"
pip install --upgrade pip
# ROCm build of torch 2.13.0 from the PyTorch wheel index for the loaded ROCm.
pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/rocm6.2.4
# mpi4py against Cray MPICH (never the mpich wheel on a Cray): the cc wrapper links it.
MPICC="cc -shared" pip install --no-cache-dir --no-binary=mpi4py mpi4py==4.1.2
pip install -r "$root/envs/frontier/requirements.txt"

# Horovod 0.28.1: ROCm + RCCL for GPU collectives, MPI for the rest. Its CMake pins C++14 but
# torch ≥ 2.1 needs C++17: the same compiler wrapper as envs/local/build-horovod.sh.
wrap="$(mktemp -d)"
# shellcheck disable=SC2016  # the wrapper's own $@ and $a
printf '#!/usr/bin/env bash\nargs=()\nfor a in "$@"; do case "$a" in -std=c++14|-std=gnu++14) args+=(-std=gnu++17);; *) args+=("$a");; esac; done\nexec CC "${args[@]}"\n' > "$wrap/c++17"
chmod +x "$wrap/c++17"
CXX="$wrap/c++17" CC=cc \
HOROVOD_GPU=ROCM HOROVOD_ROCM_HOME="$ROCM_PATH" HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_HOME="$ROCM_PATH" \
HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITHOUT_GLOO=1 \
  pip install --no-cache-dir --no-build-isolation --no-deps horovod==0.28.1 cloudpickle psutil pyyaml packaging
rm -rf "$wrap"
pip install --no-build-isolation --no-deps -e "$root"
python -c "import torch, horovod.torch as hvd; print('torch', torch.__version__, 'hip', torch.version.hip, 'horovod nccl(rccl)', hvd.nccl_built())"

# At run time (the job templates set these): RCCL over libfabric/CXI via the aws-ofi-rccl plugin.
#   export NCCL_SOCKET_IFNAME=hsn0 FI_CXI_ATS=0 NCCL_NET_GDR_LEVEL=3 FI_MR_CACHE_MONITOR=userfaultfd
#   export LD_LIBRARY_PATH=<aws-ofi-rccl>/lib:$LD_LIBRARY_PATH
