"""Node-local staging in one process (node_comm=None): copy, verify, skip, repair, fail clearly."""

import hashlib

import pytest

from exaforce.io import stage
from exaforce.io.bp import write_bp
from exaforce.io.extxyz import write_extxyz
from exaforce.io.schema import Frames
from exaforce.io.stage import StageError, sha256_tree, stage_datasets
from exaforce.io.synth import synthesize

pytestmark = pytest.mark.data


@pytest.fixture
def sources(tmp_path):
    """A .bp directory dataset and a plain-file dataset on the 'parallel file system'."""
    src = tmp_path / "pfs"
    src.mkdir()
    atoms = synthesize(12, seed=9)
    write_bp(Frames.from_atoms(atoms), src / "syn.bp", "syn")
    write_extxyz(atoms, src / "syn.xyz")
    return [src / "syn.bp", src / "syn.xyz"]


def _stage(sources, dest):
    messages = []
    staged = stage_datasets(sources, dest, None, log=messages.append)
    return staged, messages


def test_copies_and_verifies(tmp_path, sources):
    dest = tmp_path / "nvme" / "job1"
    staged, messages = _stage(sources, dest)
    assert staged == [dest / "syn.bp", dest / "syn.xyz"]
    for src, dst in zip(sources, staged):
        assert sha256_tree(dst) == sha256_tree(src)
    assert sum("copied" in m and "MB/s" in m for m in messages) == 2
    assert sorted(p.name for p in dest.iterdir()) == ["syn.bp", "syn.xyz"]  # no temp names left


def test_sha256_tree_matches_hashlib(sources):
    tree = sha256_tree(sources[0])
    assert "md.idx" in tree and "data.0" in tree
    data = (sources[0] / "data.0").read_bytes()
    assert tree["data.0"] == (len(data), hashlib.sha256(data).hexdigest())
    assert sha256_tree(sources[1]) == {".": (sources[1].stat().st_size,
                                             hashlib.sha256(sources[1].read_bytes()).hexdigest())}


def test_skips_when_present(tmp_path, sources, monkeypatch):
    dest = tmp_path / "nvme"
    _stage(sources, dest)

    def no_copy(*args):
        raise AssertionError("should not copy an identical dataset")

    monkeypatch.setattr(stage, "_copy_tree", no_copy)
    staged, messages = _stage(sources, dest)
    assert staged == [dest / "syn.bp", dest / "syn.xyz"]
    assert sum("skipped" in m for m in messages) == 2


@pytest.mark.parametrize("corrupt", ["flip_byte", "truncate", "extra_file"])
def test_corrupt_copy_is_restaged(tmp_path, sources, corrupt):
    dest = tmp_path / "nvme"
    _stage(sources, dest)
    victim = dest / "syn.bp" / "data.0"
    if corrupt == "flip_byte":  # same size: only the checksum can tell
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif corrupt == "truncate":
        victim.write_bytes(victim.read_bytes()[:-10])
    else:
        (dest / "syn.bp" / "stray").write_text("x")
    staged, messages = _stage(sources, dest)
    assert sha256_tree(staged[0]) == sha256_tree(sources[0])
    assert any("copied" in m and "syn.bp" in m for m in messages)
    assert any("skipped" in m and "syn.xyz" in m for m in messages)
    assert sorted(p.name for p in dest.iterdir()) == ["syn.bp", "syn.xyz"]


def test_missing_source_names_the_file(tmp_path, sources):
    with pytest.raises(StageError, match="missing.bp"):
        stage_datasets([sources[1], tmp_path / "missing.bp"], tmp_path / "nvme", None, log=lambda m: None)


def test_bad_copy_is_detected_and_cleaned_up(tmp_path, sources, monkeypatch):
    real_copy = stage._copy_file

    def bad_copy(src, dst, advance):
        digest = real_copy(src, dst, advance)
        with open(dst, "ab") as fh:  # the storage "changes" the bytes after they were written
            fh.write(b"\0")
        return digest

    monkeypatch.setattr(stage, "_copy_file", bad_copy)
    with pytest.raises(StageError, match="syn.bp.*does not match"):
        _stage(sources, tmp_path / "nvme")
    assert list((tmp_path / "nvme").iterdir()) == []


def test_unexpected_error_becomes_stage_error_naming_the_file(tmp_path, sources, monkeypatch):
    def broken(*args):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(stage, "_copy_file", broken)
    with pytest.raises(StageError, match="syn.xyz.*PermissionError.*read-only"):
        _stage(sources[1:], tmp_path / "nvme")
    assert list((tmp_path / "nvme").iterdir()) == []


def test_a_dataset_that_does_not_fit_fails_before_copying_or_falls_back(tmp_path, monkeypatch):
    """Free space is faked (filling a real disk is not possible here): the check runs before any copy."""
    import collections

    from exaforce.io import stage as stage_mod

    src = tmp_path / "big.bp"
    src.mkdir()
    (src / "data.0").write_bytes(b"x" * 5000)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(stage_mod.shutil, "disk_usage", lambda path: usage(10_000, 9_000, 1_000))
    dest = tmp_path / "nvme"
    with pytest.raises(stage_mod.StageError, match=r"big.bp: the datasets to stage need 0.0 MB .* has 0.0 MB free"):
        stage_mod.stage_datasets([src], dest, None, log=lambda m: None)
    assert not dest.exists() or not any(dest.iterdir())  # nothing half-written
    messages = []
    assert stage_mod.stage_datasets([src], dest, None, log=messages.append, fallback=True) == [src]
    assert "falling back to the shared file system" in messages[-1]


def test_a_second_stage_waits_for_the_first_then_verifies(tmp_path, sources):
    """Two jobs on one node stage one dataset into one folder: this test is the first (it holds the
    folder's lock and copies), a real second process waits for it, then verifies and skips."""
    import fcntl
    import os
    import shutil
    import subprocess
    import sys

    dest = tmp_path / "nvme"
    dest.mkdir()
    fd = os.open(dest, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    script = ("import sys; from pathlib import Path; from exaforce.io.stage import stage_datasets; "
              "stage_datasets([Path(sys.argv[1])], Path(sys.argv[2]), None, log=lambda m: print(m, flush=True))")
    second = subprocess.Popen([sys.executable, "-c", script, str(sources[0]), str(dest)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert "stage: waiting for another stage into" in second.stdout.readline()  # it blocks right after
        shutil.copytree(sources[0], dest / sources[0].name)  # the first job's copy
    finally:
        os.close(fd)
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    assert f"stage: {dest / sources[0].name} already present" in out and "skipped" in out, out


def test_progress_counts_the_bytes_copied_and_verified(tmp_path, sources):
    """The leader reports each dataset's copy and verification in bytes, ending at its size; a second
    stage (present, identical) reports only the verification of source and copy."""
    sizes = {src.name: sum(f.stat().st_size for f in ([src] if src.is_file() else src.rglob("*")) if f.is_file())
             for src in sources}
    calls: list[tuple[str, int, int]] = []
    stage_datasets(sources, tmp_path / "nvme", None, log=lambda m: None, progress=lambda *c: calls.append(c))
    last = {what: (done, total) for what, done, total in calls}
    assert last == {f"copying {n}": (s, s) for n, s in sizes.items()} | \
        {f"verifying the copy of {n}": (s, s) for n, s in sizes.items()}
    for what in last:  # monotonic
        done = [d for w, d, _ in calls if w == what]
        assert done == sorted(done)
    calls.clear()
    stage_datasets(sources, tmp_path / "nvme", None, log=lambda m: None, progress=lambda *c: calls.append(c))
    last = {what: (done, total) for what, done, total in calls}
    assert last == {f"verifying {n} against its source": (2 * s, 2 * s) for n, s in sizes.items()}


def test_progress_in_mb_in_a_job_log():
    """`exaforce stage` hands bytes to a ProgressReport that shows MB (scale 1e-6)."""
    import io

    from exaforce.console import ProgressReport

    ticks = iter(range(10**6))
    log = io.StringIO()
    with ProgressReport("stage: copying big.bp", unit="MB", stream=log, clock=lambda: float(next(ticks)),
                        scale=1e-6) as progress:
        for done in range(1, 51):
            progress(done * 20_000_000, 1_000_000_000)
    assert log.getvalue().splitlines()[-1].startswith("  stage: copying big.bp: 1000/1000 MB (100 %), 20 MB/s")
