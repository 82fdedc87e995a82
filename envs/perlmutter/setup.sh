#!/usr/bin/env bash
# Perlmutter (NERSC) GPU nodes: 4× NVIDIA A100 per node, Slingshot-11, Cray MPICH.
# A venv with the CUDA build of PyTorch, mpi4py against Cray MPICH (CUDA-aware), Horovod with NCCL.
#   bash envs/perlmutter/setup.sh [VENV_DIR]     (run once on a login node)
# Not runnable on a workstation: module names follow NERSC's documentation.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${1:-$root/.venv-perlmutter}"

module load PrgEnv-gnu
module load cudatoolkit/12.4
module load nccl/2.21.5
module load cray-python
export MPICH_GPU_SUPPORT_ENABLED=1

python3 -m venv "$venv"
# shellcheck disable=SC1091  # the venv is created just above
source "$venv/bin/activate"
pip install --upgrade pip
pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124
MPICC="cc -target-accel=nvidia80 -shared" pip install --no-cache-dir --no-binary=mpi4py mpi4py==4.1.2
pip install -r "$root/envs/perlmutter/requirements.txt"

wrap="$(mktemp -d)"
# shellcheck disable=SC2016  # the wrapper's own $@ and $a
printf '#!/usr/bin/env bash\nargs=()\nfor a in "$@"; do case "$a" in -std=c++14|-std=gnu++14) args+=(-std=gnu++17);; *) args+=("$a");; esac; done\nexec CC "${args[@]}"\n' > "$wrap/c++17"
chmod +x "$wrap/c++17"
CXX="$wrap/c++17" CC=cc \
HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_HOME="$NCCL_DIR" HOROVOD_CUDA_HOME="$CUDA_HOME" \
HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITHOUT_GLOO=1 \
  pip install --no-cache-dir --no-build-isolation --no-deps horovod==0.28.1 cloudpickle psutil pyyaml packaging
rm -rf "$wrap"
pip install --no-build-isolation --no-deps -e "$root"
python -c "import torch, horovod.torch as hvd; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'horovod nccl', hvd.nccl_built())"

# At run time: NCCL over Slingshot with the aws-ofi-nccl plugin NERSC provides in the nccl module.
#   export NCCL_NET_GDR_LEVEL=PHB FI_CXI_RDZV_PROTO=alt_read
