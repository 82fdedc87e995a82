#!/usr/bin/env bash
# The whole test suite: unit tests, MPI tests (mpiexec -n 2 and 4 as subprocesses), integration.
# Run through `make test` (which sets up .venv first). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m pytest "$@"
