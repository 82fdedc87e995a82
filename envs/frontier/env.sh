# Run-time environment of an exaforce job on Frontier; sourced by the rendered job scripts.
# The venv comes from envs/frontier/setup.sh (EXAFORCE_VENV overrides its location).
# shellcheck shell=bash
module load PrgEnv-gnu rocm/6.2.4 craype-accel-amd-gfx90a cray-python
export MPICH_GPU_SUPPORT_ENABLED=1                   # GPU-aware Cray MPICH
# RCCL over Slingshot (libfabric CXI) through the aws-ofi-rccl plugin (OLCF user guide, "RCCL").
export NCCL_SOCKET_IFNAME=hsn0 NCCL_NET_GDR_LEVEL=3 NCCL_CROSS_NIC=1
export FI_CXI_ATS=0 FI_MR_CACHE_MONITOR=userfaultfd FI_CXI_DEFAULT_CQ_SIZE=131072
export LD_LIBRARY_PATH="${AWS_OFI_RCCL_DIR:-/lustre/orion/world-shared/stf218/aws-ofi-rccl}/lib:${LD_LIBRARY_PATH:-}"
export MIOPEN_USER_DB_PATH="/tmp/$USER-miopen" MIOPEN_CUSTOM_CACHE_DIR="/tmp/$USER-miopen"
# shellcheck disable=SC1091
source "${EXAFORCE_VENV:-$(dirname "${BASH_SOURCE[0]}")/../../.venv-frontier}/bin/activate"
