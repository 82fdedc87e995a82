"""A full disk is one clear line naming the path and exit 2, with no partial output left as if it
were complete, and every earlier result (datasets, checkpoints) still valid.

The CLI cases write into a small tmpfs mounted for the test (it needs root, as on the CI VM, and
skips elsewhere); the in-process cases inject ENOSPC at the writer instead and run everywhere."""

from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import make_emt_dataset, run_cli, small_run_config
from exaforce.io import atomic
from exaforce.io.atomic import DiskFullError, write_file_atomically

pytestmark = pytest.mark.faults


@pytest.fixture()
def small_fs(tmp_path):
    """mount(size) → a fresh tmpfs of `size` bytes under tmp_path, unmounted afterwards."""
    mounts: list[Path] = []

    def mount(size: int) -> Path:
        where = tmp_path / f"fs{len(mounts)}"
        where.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); the injected cases cover the writers")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("diskfull")
    make_emt_dataset(root, 300)
    small_run_config(root, steps=2, log_every=1, checkpoint_every=1)
    return root


def _one_line(result, *expected: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("exaforce: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr and "terminate" not in result.stderr, result.stderr
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def test_convert_and_predict_on_a_full_disk(data, small_fs):
    fs = small_fs(64 * 1024)
    _one_line(run_cli(["data", "convert", "emt.extxyz", "--out", str(fs / "emt.bp"), "--name", "emt"], cwd=data),
              f"exaforce: error: {fs / 'emt.bp'}: no space left on device: writing it needs about")
    _one_line(run_cli(["predict", "--preset", "small", "--data", "emt.bp", "--out", str(fs / "pred.bp")], cwd=data),
              f"exaforce: error: {fs / 'pred.bp'}: no space left on device: writing it needs about")
    assert list(fs.iterdir()) == []  # nothing partial, nothing that looks complete


def test_train_stops_clearly_and_the_earlier_checkpoints_resume(data, small_fs):
    fs = small_fs(8 * 1024 * 1024)
    run_dir = fs / "run"
    assert run_cli(["train", "--config", "run.toml", "--out-dir", str(run_dir)], cwd=data).returncode == 0
    filler = fs / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(fs).free - 16 * 1024))  # room for log lines, not a checkpoint
    line = _one_line(run_cli(["train", "--config", "run.toml", "--out-dir", str(run_dir), "--steps", "4",
                              "--resume"], cwd=data), "no space left on device")
    assert str(run_dir / "checkpoints") in line, line
    filler.unlink()
    result = run_cli(["train", "--config", "run.toml", "--out-dir", str(run_dir), "--steps", "4", "--resume"], cwd=data)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout and "step-00000002" in result.stdout and "step     4/4" in result.stdout


def test_injected_enospc_at_the_atomic_writer(tmp_path, monkeypatch):
    """torch.save hides the errno ("unexpected pos"): a writer failing on a full file system is
    DiskFullError; the old file is kept and no temporary is left."""
    path = tmp_path / "model.pt"
    path.write_bytes(b"old")

    def full(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=f"{path}: no space left on device"):
        write_file_atomically(path, full)
    monkeypatch.setattr(atomic, "free_bytes", lambda folder: 1000)

    def hidden(f):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    with pytest.raises(DiskFullError, match=r"no space left on device \(0.001 MB free there\)"):
        write_file_atomically(path, hidden)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_a_dataset_that_cannot_fit_is_refused_before_adios2_starts(tmp_path, monkeypatch):
    from exaforce.io.bp import write_bp
    from exaforce.io.schema import Frames
    from exaforce.io.synth import synthesize

    monkeypatch.setattr(atomic, "free_bytes", lambda folder: 10_000)
    with pytest.raises(DiskFullError, match="out.bp: no space left on device: writing it needs about"):
        write_bp(Frames.from_atoms(synthesize(20, seed=0)), tmp_path / "out.bp", "x")
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_run_folder_is_one_line_and_exit_2(data, small_fs):
    fs = small_fs(1024 * 1024)
    subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
    _one_line(run_cli(["train", "--config", "run.toml", "--out-dir", str(fs / "run")], cwd=data),
              f"run.out_dir = {fs / 'run'}: cannot write there (Read-only file system)")
