"""--overwrite replaces only what exaforce wrote: `predict --overwrite` (and every dataset writer)
refuses an --out that is a user's folder, a regular file or a link, and leaves it as it was."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import make_emt_dataset, run_cli
from exaforce.io.bp import open_bp, write_bp
from exaforce.io.schema import DataError

pytestmark = [pytest.mark.security, pytest.mark.data]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_emt_dataset(tmp_path_factory.mktemp("overwrite"), 4)


def _victims(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "link.bp").symlink_to(folder)
    return {"folder": folder, "file": tmp_path / "notes.txt", "link": tmp_path / "link.bp"}


def _intact(tmp_path: Path) -> None:
    assert (tmp_path / "results" / "thesis.tex").read_text() == "years of work"
    assert (tmp_path / "notes.txt").read_text() == "keep me" and (tmp_path / "link.bp").is_symlink()


@pytest.mark.parametrize("victim", ["folder", "file", "link"])
def test_predict_overwrite_refuses_what_is_not_a_dataset(data, tmp_path, victim):
    out = _victims(tmp_path)[victim]
    result = run_cli(["predict", "--preset", "small", "--data", str(data), "--out", str(out), "--overwrite"])
    assert result.returncode == 2, result.stderr
    assert f"--out {out}: exists and is not a BP5 dataset; refusing to replace it" in result.stderr, result.stderr
    _intact(tmp_path)


def test_predict_overwrite_replaces_its_own_output(data, tmp_path):
    out = tmp_path / "pred.bp"
    for _ in range(2):
        result = run_cli(["predict", "--preset", "small", "--data", str(data), "--out", str(out), "--overwrite"])
        assert result.returncode == 0, result.stderr
    with open_bp(out) as reader:
        assert len(reader) == 4


@pytest.mark.parametrize("victim", ["folder", "file", "link"])
def test_dataset_writer_refuses_what_is_not_a_dataset(data, tmp_path, victim):
    out = _victims(tmp_path)[victim]
    with open_bp(data) as reader:
        frames = reader.read(0, len(reader))
    with pytest.raises(DataError, match="exists and is not a BP5 dataset; refusing to replace it"):
        write_bp(frames, out, "emt", overwrite=True)
    _intact(tmp_path)
