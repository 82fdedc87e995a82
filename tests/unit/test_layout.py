"""The package layout: io/ is exaforce.io, never the standard library's io; imports point one way."""

import subprocess
import sys

from conftest import REPO


def python_in_repo(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_import_io_from_repo_root_is_stdlib():
    assert python_in_repo("import io; print(hasattr(io, 'BytesIO'), io.__name__)") == "True io"
    assert python_in_repo("import exaforce.io, os; print(os.path.relpath(exaforce.io.__file__))") == "io/__init__.py"


def test_io_and_perf_never_import_the_model():
    code = ("import sys, exaforce.io.bp, exaforce.io.extxyz, exaforce.io.stage, exaforce.io.sampler, "
            "exaforce.perf.runlog, exaforce.perf.summary, exaforce.perf.plots, exaforce.perf.render, exaforce.perf.campaign, exaforce.perf.formatting, exaforce.perf.flops, exaforce.perf.machines; "
            "print(sorted(m for m in sys.modules if m.startswith(('exaforce.model', 'exaforce.training', 'exaforce.parallel', 'exaforce.cli'))))")
    assert python_in_repo(code) == "[]"


# ---------------------------------------------------------------- who communicates
import ast
from pathlib import Path

APP = Path(REPO) / "app"
# Communicator and backend methods that are collectives (mpi4py, exaforce.comm.groups.Group).
COLLECTIVES = {"allreduce", "Allreduce", "Iallreduce", "allgather", "Allgather", "Allgatherv", "bcast", "Bcast",
               "Barrier", "barrier_", "Gather", "Gatherv", "scatter", "Scatter", "Alltoall", "Alltoallv", "alltoall",
               "alltoallv", "Reduce", "exscan", "Exscan", "broadcast_", "allreduce_sum_async", "all_to_all"}
OWNERS = ("parallel", "comm")          # app/parallel/, app/comm/: the only communicating packages
DOCUMENTED = {"checkpoint.py",         # the checkpoint's documented broadcast of a restored state
              "lammps.py"}             # the fix external callback's gather/scatter on LAMMPS's own communicator


def _is_topology(receiver: ast.expr) -> bool:
    """`topo.x(...)` / `self.topo.x(...)` / `parallel.topo.x(...)`: the Topology's named host collectives
    (implemented in app/parallel/topology.py), not a raw communicator's."""
    return (isinstance(receiver, ast.Name) and receiver.id == "topo") or \
        (isinstance(receiver, ast.Attribute) and receiver.attr == "topo")


def collective_calls(path: Path) -> list[str]:
    """Calls of a collective in one file: `comm.allreduce(...)`, `all_to_all(...)`, and MPI's
    `comm.gather(obj, root=...)` / `scatter(..., root=...)` (torch's tensor.gather/scatter take no root)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        if isinstance(node.func, ast.Attribute) and _is_topology(node.func.value):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        rooted = name in ("gather", "scatter") and any(k.arg == "root" for k in node.keywords)
        if (name in COLLECTIVES - {"scatter"}) or rooted:
            found.append(f"{path.relative_to(APP) if path.is_relative_to(APP) else path.name}:{node.lineno}: {name}")
    return found


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_no_collective_outside_parallel_and_comm():
    """Every exchange outside exaforce.parallel and exaforce.comm goes through the Topology's named
    host collectives (topo.sum, topo.allgather, ...) or a backend group owned there."""
    outside = [p for p in APP.rglob("*.py")
               if p.relative_to(APP).parts[0] not in OWNERS and p.name not in DOCUMENTED]
    assert len(outside) > 20  # the walk sees the whole package
    assert [hit for p in outside for hit in collective_calls(p)] == []


def test_the_check_sees_a_raw_collective(tmp_path):
    """The detector above can fail: it finds raw collectives and skips torch's gather."""
    sample = tmp_path / "probe.py"
    sample.write_text("def f(topo, x):\n    topo.world.allreduce(x)\n    x.gather(1, x)\n    x.scatter(1, x, 1.0)\n"
                      "    topo.world.gather(x, root=0)\n    topo.allgather(x)\n    all_to_all(x, (1,), (1,), x)\n")
    assert [h.split(": ")[1] for h in collective_calls(sample)] == ["allreduce", "gather", "all_to_all"]


def test_model_imports_nothing_that_communicates():
    """model/ is pure modules: no exaforce.comm, exaforce.parallel or mpi4py import."""
    bad = {f"{p.relative_to(APP)}: {m}" for p in (APP / "model").rglob("*.py") for m in imported_modules(p)
           if m.startswith(("exaforce.comm", "exaforce.parallel", "mpi4py", "torch.distributed", "horovod"))}
    assert bad == set()
