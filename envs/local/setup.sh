#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment with pinned dependencies.
#   bash envs/local/setup.sh [VENV_DIR]        (default: .venv in the repository root)
# Idempotent: a venv whose stamp matches requirements.txt is left alone.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${1:-$root/.venv}"
req="$here/requirements.txt"
ref_req="$here/requirements-reference.txt"
nodeps_req="$here/requirements-nodeps.txt"
torch_pin="torch==2.13.0"
stamp="$venv/.exaforce-setup-stamp"
want="$(cat "$req" "$ref_req" "$nodeps_req" "$root/setup.cfg" | sha256sum | cut -d' ' -f1) $torch_pin"

say()  { printf '[envs/local] %s\n' "$*"; }
fail() { printf '[envs/local] ERROR: %s\n' "$*" >&2; exit 1; }

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  say "environment $venv is up to date"
  exit 0
fi

py="${PYTHON:-python3}"
command -v "$py" >/dev/null || fail "no $py on PATH: install Python 3.11"
"$py" - <<'PY' || fail "Python >= 3.10 is required"
import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY

if [[ ! -x "$venv/bin/python" ]]; then
  say "creating virtual environment $venv"
  "$py" -m venv "$venv" || fail "python -m venv failed (install python3-venv)"
fi
pip_quiet() {  # this machine's pip config lists index folders that may be absent: drop those warnings
  "$venv/bin/python" -m pip --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}

say "installing $torch_pin (CPU build) on its own, so no other package can pull a CUDA build"
pip_quiet install -q "$torch_pin" || fail "pip install $torch_pin failed"

say "installing pinned dependencies from $req"
pip_quiet install -q -r "$req" "$torch_pin" || fail "pip install -r $req failed"

say "installing $nodeps_req without their declared dependencies (see the file)"
pip_quiet install -q --no-deps -r "$nodeps_req" || fail "pip install -r $nodeps_req failed"

say "installing the reference models (MatRIS, MACE) for 'bench step --compare matris,mace' and 'bench accuracy --compare mace' from $ref_req"
# --no-deps: its declared dependencies would pull another torch. matris 1.0.0 declares
# Requires-Python >= 3.12 but runs on 3.11 (checked by the bench), hence --ignore-requires-python.
pip_quiet install -q --no-deps --ignore-requires-python -r "$ref_req" || fail "pip install -r $ref_req failed"

say "installing exaforce (editable) from $root"
pip_quiet install -q --no-build-isolation --no-deps -e "$root" \
  || fail "editable install of exaforce failed"

say "checking the installation"
"$venv/bin/python" - <<'PY' || fail "import check failed (see above)"
import torch, mpi4py, adios2, h5py, ase, vesin, numpy, matplotlib, jinja2, tblite.ase, exaforce
import safetensors, tensorboard, lmdb, ase_db_backends.aselmdb  # model export, run.tensorboard, .aselmdb
from mpi4py import MPI
print(f"[envs/local] torch {torch.__version__}, mpi4py {mpi4py.__version__} ({MPI.Get_library_version().splitlines()[0]}), "
      f"adios2 {adios2.__version__}, ase {ase.__version__}, exaforce {exaforce.__version__}")
PY
command -v "$venv/bin/mpiexec" >/dev/null || fail "mpiexec missing from $venv/bin (the mpich wheel provides it)"
echo "$want" > "$stamp"
say "done: activate with 'source $venv/bin/activate'"
