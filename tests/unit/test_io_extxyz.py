"""extxyz: lossless round trip, and every kind of bad input named by file, frame and field."""

from collections.abc import Callable

import ase.io
import numpy as np
import pytest

from exaforce.io.extxyz import read_extxyz, write_extxyz
from exaforce.io.schema import DataError, Frames
from exaforce.io.synth import synthesize

pytestmark = pytest.mark.data


def _assert_bit_equal(a: Frames, b: Frames) -> None:
    assert a.optional == b.optional
    for field, x in a.columns().items():
        y = getattr(b, field)
        assert x.dtype == y.dtype, field
        assert np.array_equal(x, y, equal_nan=True), field


def test_round_trip_is_exact(tmp_path):
    atoms_list = synthesize(25, seed=11)
    path = tmp_path / "data.xyz"
    write_extxyz(atoms_list, path)
    _assert_bit_equal(read_extxyz(path), Frames.from_atoms(atoms_list))


def test_frames_without_stress_and_non_periodic_round_trip(tmp_path):
    frames = Frames.from_atoms(synthesize(4, seed=5))
    frames.stress_S6[1] = np.nan
    frames.cell_S33[2] = 0.0
    frames.pbc_S3[2] = False
    frames.stress_S6[2] = np.nan
    path = tmp_path / "mixed.xyz"
    write_extxyz(frames, path)
    _assert_bit_equal(read_extxyz(path), frames)


def test_ase_reads_what_we_write(tmp_path):
    atoms_list = synthesize(5, seed=2)
    path = tmp_path / "data.xyz"
    write_extxyz(atoms_list, path)
    back = ase.io.read(path, ":", format="extxyz")
    for ours, theirs in zip(atoms_list, back):
        assert np.array_equal(ours.positions, theirs.positions)
        assert np.array_equal(ours.get_forces(), theirs.get_forces())
        assert ours.get_potential_energy() == theirs.get_potential_energy()
        assert np.array_equal(ours.get_stress(), theirs.get_stress())


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "data.xyz"
    write_extxyz(synthesize(2, seed=1), path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("exaforce.io.extxyz.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_extxyz(synthesize(3, seed=2), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["data.xyz"]


# ---------------------------------------------------------------- bad input


@pytest.fixture
def good_lines(tmp_path) -> list[str]:
    """The lines of a valid three-frame file, to be broken one way at a time."""
    path = tmp_path / "good.xyz"
    write_extxyz(synthesize(3, seed=4), path)
    return path.read_text().splitlines()


def _frame_start(lines: list[str], k: int) -> int:
    i = 0
    for _ in range(k):
        i += int(lines[i]) + 2
    return i


def _edit(k: int, fn: Callable[[list[str], int], None]) -> Callable[[list[str]], list[str]]:
    """Apply fn(lines, index of frame k's count line) to a copy of the lines."""
    def apply(lines: list[str]) -> list[str]:
        lines = list(lines)
        fn(lines, _frame_start(lines, k))
        return lines
    return apply


def _set(offset: int, transform: Callable[[str], str]) -> Callable[[list[str], int], None]:
    def fn(lines: list[str], i: int) -> None:
        lines[i + offset] = transform(lines[i + offset])
    return fn


def _drop_forces(lines: list[str], i: int) -> None:
    lines[i + 1] = lines[i + 1].replace(":forces:R:3", "")
    for j in range(int(lines[i])):
        lines[i + 2 + j] = " ".join(lines[i + 2 + j].split()[:4])


def _no_cell(comment: str) -> str:
    head, rest = comment.split('Lattice="', 1)
    return head + rest.split('"', 1)[1].lstrip().replace('pbc="T T T"', 'pbc="F F F"')


def _replace_token(col: int, value: str) -> Callable[[str], str]:
    def fn(line: str) -> str:
        tokens = line.split()
        tokens[col] = value
        return " ".join(tokens)
    return fn


def _energy_to(value: str) -> Callable[[str], str]:
    def fn(comment: str) -> str:
        head, rest = comment.split(" energy=", 1)
        return f"{head} energy={value} {rest.split(' ', 1)[1]}"
    return fn


BAD_CASES = {
    "count line not a number": (_edit(1, _set(0, lambda s: "two")), 1, "natoms"),
    "count line two numbers": (_edit(1, _set(0, lambda s: s + " 3")), 1, "natoms"),
    "truncated last frame": (lambda lines: lines[:-1], 2, "natoms"),
    "missing column": (_edit(1, _set(2, lambda s: s.rsplit(" ", 1)[0])), 1, "columns"),
    "extra column": (_edit(1, _set(2, lambda s: s + " 0.5")), 1, "columns"),
    "non-numeric position": (_edit(1, _set(2, _replace_token(2, "1.0x"))), 1, "positions"),
    "non-numeric force": (_edit(0, _set(2, _replace_token(5, "abc"))), 0, "forces"),
    "unknown element": (_edit(1, _set(2, _replace_token(0, "Xq"))), 1, "species"),
    "no energy": (_edit(1, _set(1, lambda s: _energy_to("")(s).replace(" energy= ", " "))), 1, "energy"),
    "no forces": (_edit(1, _drop_forces), 1, "forces"),
    "nan energy": (_edit(1, _set(1, _energy_to("nan"))), 1, "energy"),
    "inf position": (_edit(2, _set(3, _replace_token(1, "inf"))), 2, "positions"),
    "nan force": (_edit(1, _set(2, _replace_token(4, "nan"))), 1, "forces"),
    "stress without cell": (_edit(1, _set(1, _no_cell)), 1, "stress"),
    "malformed lattice": (_edit(1, _set(1, lambda s: s.replace('Lattice="', 'Lattice="1 2 3 ', 1))), 1, "comment"),
    "bad pbc": (_edit(1, _set(1, lambda s: s.replace('pbc="T T T"', 'pbc="T X T"'))), 1, "pbc"),
    # Column count matches, so only ASE's own parser can object: its error must carry the frame.
    "ase rejects shapes": (_edit(1, _set(1, lambda s: s.replace("pos:R:3:forces:R:3", "pos:R:2:forces:R:4"))),
                           1, None),
    "blank line between frames": (_edit(1, lambda lines, i: lines.insert(i, "")), 1, "natoms"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_frame_is_named(case, good_lines, tmp_path):
    mutate, frame, field = BAD_CASES[case]
    path = tmp_path / f"bad_{case.replace(' ', '_')}.xyz"
    path.write_text("\n".join(mutate(good_lines)) + "\n")
    with pytest.raises(DataError) as info:
        read_extxyz(path)
    message = str(info.value)
    assert path.name in message
    assert f"frame {frame}" in message
    assert info.value.frame == frame
    if field is not None:
        assert info.value.field == field, message


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.xyz.*no such file"):
        read_extxyz(tmp_path / "nope.xyz")


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_empty_file(tmp_path, text):
    path = tmp_path / "empty.xyz"
    path.write_text(text)
    with pytest.raises(DataError, match="empty.xyz.*empty"):
        read_extxyz(path)


def test_trailing_blank_lines_are_fine(tmp_path, good_lines):
    path = tmp_path / "trailing.xyz"
    path.write_text("\n".join(good_lines) + "\n\n\n")
    assert len(read_extxyz(path)) == 3
