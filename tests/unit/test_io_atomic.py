"""Atomic writes follow the umask (a checkpoint shared with the group is readable by it), as the
files exaforce writes without a temporary (datasets, logs) do."""

from __future__ import annotations

import os
import stat

import pytest

from exaforce.io.atomic import umask, write_file_atomically

pytestmark = pytest.mark.faults


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_written_files_follow_the_umask(tmp_path, mask):
    previous = os.umask(mask)
    try:
        assert umask() == mask
        path = tmp_path / "model.pt"
        write_file_atomically(path, lambda f: f.write(b"weights"))
        plain = tmp_path / "log.jsonl"
        plain.write_text("{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~mask
