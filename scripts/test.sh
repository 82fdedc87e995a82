#!/usr/bin/env bash
# The test suite, run through `make test` (which sets up .venv first).
#
#   scripts/test.sh            every test not marked `slow` (what CI runs): the unit and security
#                              tests on two pytest-xdist workers (each test is one process on one
#                              core), then the GPU, integration and MPI tests one at a time (they
#                              start their own ranks, which take both cores)
#   scripts/test.sh --all      the same two passes with the `slow` tests too (`make test-all`)
#   scripts/test.sh ARGS…      one plain pytest run with ARGS (e.g. `-m physics`, a file, `-k name`)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

if [[ $# -gt 0 && $1 != --all ]]; then
    exec python -m pytest "$@"
fi
select=(-m "not slow")
[[ ${1:-} == --all ]] && select=()

status=0
python -m pytest -n 2 "${select[@]}" tests/unit tests/security || status=$?
python -m pytest "${select[@]}" tests/gpu tests/integration tests/mpi || status=$?
exit "$status"
