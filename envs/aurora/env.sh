# Run-time environment of an exaforce job on Aurora; sourced by the rendered job scripts.
# The venv comes from envs/aurora/setup.sh (EXAFORCE_VENV overrides its location).
# shellcheck shell=bash
module load frameworks
# One rank per stack; oneCCL over MPI and the CXI provider (ALCF Aurora documentation).
export ZE_FLAT_DEVICE_HIERARCHY=FLAT CCL_PROCESS_LAUNCHER=pmix CCL_ATL_TRANSPORT=mpi FI_PROVIDER=cxi
export CCL_KVS_MODE=mpi CCL_ZE_IPC_EXCHANGE=pidfd FI_MR_CACHE_MONITOR=disabled
# shellcheck disable=SC1091
source "${EXAFORCE_VENV:-$(dirname "${BASH_SOURCE[0]}")/../../.venv-aurora}/bin/activate"
