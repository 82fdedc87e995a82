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
            "exaforce.perf.report, exaforce.perf.flops, exaforce.perf.machines; "
            "print(sorted(m for m in sys.modules if m.startswith(('exaforce.model', 'exaforce.train', 'exaforce.cli'))))")
    assert python_in_repo(code) == "[]"
