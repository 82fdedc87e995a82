#!/usr/bin/env bash
# Build Horovod 0.28.1 (PyPI sdist) into the venv once: PyTorch extension, MPI CPU operations.
#   bash envs/local/build-horovod.sh [VENV_DIR]
# Idempotent: returns at once when the venv's horovod.torch already imports with MPI built in.
# A few minutes on 2 cores (a whole fresh `make test` took 7 min 43 s). Why a compiler wrapper: Horovod's CMake pins C++14, but torch ≥ 2.1
# headers need C++17; the wrapper rewrites -std=c++14/gnu++14 to gnu++17 on every compile.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${1:-$root/.venv}"
say()  { printf '[envs/local/horovod] %s\n' "$*"; }
fail() { printf '[envs/local/horovod] ERROR: %s\n' "$*" >&2; exit 1; }

check() {
  "$venv/bin/python" - <<'PY' 2>/dev/null
import horovod.torch as hvd, sys
sys.exit(0 if hvd.mpi_built() else 1)
PY
}
if check; then
  say "horovod $("$venv/bin/python" -c 'import horovod; print(horovod.__version__)') with MPI is installed"
  exit 0
fi

wrap="$(mktemp -d)"
trap 'rm -rf "$wrap"' EXIT
cat > "$wrap/c++17" <<'WRAP'
#!/usr/bin/env bash
args=()
for a in "$@"; do
  case "$a" in -std=c++14|-std=gnu++14) args+=("-std=gnu++17") ;; *) args+=("$a") ;; esac
done
exec g++ "${args[@]}"
WRAP
chmod +x "$wrap/c++17"

say "building horovod==0.28.1 (PyTorch, MPI from $venv/bin/mpicxx, no TensorFlow/MXNet/Gloo); a few minutes"
# --no-build-isolation: build against the venv's torch 2.13.0 CPU (isolation would fetch another torch);
# --no-deps with its small runtime requirements pinned beside it.
PATH="$venv/bin:$PATH" CXX="$wrap/c++17" CC=gcc \
HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
HOROVOD_WITHOUT_GLOO=1 HOROVOD_CPU_OPERATIONS=MPI MAKEFLAGS="-j$(nproc)" \
  "$venv/bin/python" -m pip --disable-pip-version-check install -q --no-build-isolation --no-deps \
  --no-cache-dir horovod==0.28.1 cloudpickle==3.1.2 psutil==7.2.2 pyyaml==6.0.3 packaging==26.3 \
  2> >(grep -v "is ignored: it is neither" >&2) || fail "pip install horovod==0.28.1 failed (see above)"
check || fail "horovod installed but horovod.torch does not import with MPI built in"
say "horovod $("$venv/bin/python" -c 'import horovod; print(horovod.__version__)') built with MPI"
