#!/usr/bin/env bash
# The test suite, run through `make test` (which sets up .venv first).
#
#   scripts/test.sh            every test not marked `slow` (what CI runs): the unit and security
#                              tests on two pytest-xdist workers (each test is one process on one
#                              core), then every other test one at a time (GPU, integration, MPI:
#                              they start their own ranks, which take both cores)
#   scripts/test.sh --all      the same two passes with the `slow` tests too (`make test-all`)
#   scripts/test.sh ARGS…      one plain pytest run with ARGS (e.g. `-m physics`, a file, `-k name`)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

select=(-m "not slow")
if [[ ${1:-} == --all ]]; then
    [[ $# -eq 1 ]] || { echo "scripts/test.sh: --all takes no other arguments (got: ${*:2})" >&2; exit 2; }
    select=()
elif [[ $# -gt 0 ]]; then
    exec python -m pytest "$@"
fi

# The second pass is everything the first does not take, so a new test folder cannot be left out.
parallel=(tests/unit tests/security)
status=0
python -m pytest -n 2 "${select[@]}" "${parallel[@]}" || status=$?
python -m pytest "${select[@]}" tests "${parallel[@]/#/--ignore=}" || status=$?
exit "$status"
