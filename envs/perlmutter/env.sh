# Run-time environment of an exaforce job on Perlmutter GPU nodes; sourced by the rendered job scripts.
# The venv comes from envs/perlmutter/setup.sh (EXAFORCE_VENV overrides its location).
# shellcheck shell=bash
module load PrgEnv-gnu cudatoolkit/12.4 nccl/2.21.5 cray-python
export MPICH_GPU_SUPPORT_ENABLED=1
# NCCL over Slingshot with the aws-ofi-nccl plugin of NERSC's nccl module.
export NCCL_NET_GDR_LEVEL=PHB FI_CXI_RDZV_PROTO=alt_read FI_CXI_DISABLE_HOST_REGISTER=1
# shellcheck disable=SC1091
source "${EXAFORCE_VENV:-$(dirname "${BASH_SOURCE[0]}")/../../.venv-perlmutter}/bin/activate"
