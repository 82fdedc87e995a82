"""Extended XYZ in and out: lossless writing, and reading that names the frame of any bad input.

Why our own writer: ASE's extxyz writer prints positions and forces with 8 decimals, so a round
trip changes the data. We print every float with `repr` (shortest string that parses back to the
same float64), which is still plain extxyz that `ase.io.read` understands.

Why we split frames ourselves: ASE scans the whole file for frame boundaries before parsing, so
its errors cannot say which frame is bad, and it silently ignores extra columns. We locate each
frame from its atom-count line, check the column count against `Properties`, then let ASE parse
one frame at a time and re-raise anything it throws as DataError(frame=k).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from io import StringIO
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers, chemical_symbols
from ase.io.extxyz import PROPERTY_NAME_MAP, key_val_str_to_dict, read_xyz

from exaforce.io.atomic import write_file_atomically
from exaforce.io.schema import DataError, Frames, LabelKeys

DEFAULT_PROPERTIES = "species:S:1:pos:R:3"
WRITE_PROPERTIES = "species:S:1:pos:R:3:forces:R:3"
PROPERTY_PARSERS = {"R": float, "I": int, "S": str, "L": str}
ASE_NAMES = {extxyz_name: ase_name for ase_name, extxyz_name in PROPERTY_NAME_MAP.items()}  # pos -> positions


# ---------------------------------------------------------------- writing


def write_extxyz(atoms_list: Iterable[Atoms] | Frames, path: str | os.PathLike) -> None:
    """Write labelled structures losslessly; the file appears complete or not at all."""
    path = Path(path)
    frames = atoms_list if isinstance(atoms_list, Frames) else Frames.from_atoms(atoms_list, path)
    frames.validate(path)
    text = "".join(_format_frame(frames, s) for s in range(len(frames)))
    write_file_atomically(path, lambda fh: fh.write(text.encode("utf-8")))


def _format_frame(frames: Frames, s: int) -> str:
    """One frame: count line, comment line (cell, labels, pbc), one line per atom."""
    start, n = int(frames.offsets_S[s]), int(frames.natoms_S[s])
    comment = []
    if frames.cell_S33[s].any():
        comment.append(f'Lattice="{_floats(frames.cell_S33[s].ravel())}"')
    magmoms = None if frames.magmoms_N is None else frames.magmoms_N[start:start + n, None]
    if magmoms is not None and np.isnan(magmoms).any():  # NaN: not given for this structure
        magmoms = None
    comment.append(f"Properties={WRITE_PROPERTIES}" + (":magmoms:R:1" if magmoms is not None else ""))
    comment.append(f"energy={float(frames.energy_S[s])!r}")
    for key, value_S in (("charge", frames.charge_S), ("spin", frames.spin_S)):
        if value_S is not None and not np.isnan(value_S[s]):
            comment.append(f"{key}={float(value_S[s])!r}")
    stress = frames.stress_S6[s]
    if not np.isnan(stress).any():
        xx, yy, zz, yz, xz, xy = stress.tolist()
        # ASE reads `stress` as a 3x3 matrix (9 values), not Voigt.
        comment.append(f'stress="{_floats([xx, xy, xz, xy, yy, yz, xz, yz, zz])}"')
    comment.append('pbc="{}"'.format(" ".join("T" if p else "F" for p in frames.pbc_S3[s])))
    lines = [str(n), " ".join(comment)]
    columns = np.concatenate([frames.positions_N3[start:start + n], frames.forces_N3[start:start + n],
                              *([magmoms] if magmoms is not None else [])], axis=1)
    for z, row in zip(frames.numbers_N[start:start + n].tolist(), columns.tolist()):
        lines.append(f"{chemical_symbols[z]} {_floats(row)}")
    return "\n".join(lines) + "\n"


def _floats(values: Iterable[float]) -> str:
    """Space-separated shortest round-trip representation of each float64."""
    return " ".join(repr(float(v)) for v in values)


# ---------------------------------------------------------------- reading


def read_extxyz(path: str | os.PathLike, keys: LabelKeys | None = None,
                progress: Callable[[int, int], None] = lambda done, total: None) -> Frames:
    """All frames of an extxyz file, validated; bad input raises DataError naming file and frame.
    `keys`: the labels' names (default energy/forces/stress, else MACE's REF_*); `progress` hears of
    every frame parsed (done, total)."""
    path = Path(path)
    lines = _read_lines(path)
    spans = _frame_spans(path, lines)
    atoms_list = []
    for k, (first, natoms) in enumerate(spans):
        atoms_list.append(_parse_frame(path, lines, first, natoms, k))
        progress(k + 1, len(spans))
    return Frames.from_atoms(atoms_list, path, keys)


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(path, "no such file" if not path.exists() else "not a regular file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(path, f"not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    if not text.strip():
        raise DataError(path, "empty file: no frames")
    return text.splitlines()


def _frame_spans(path: Path, lines: list[str]) -> list[tuple[int, int]]:
    """(index of count line, atom count) for every frame; trailing blank lines are allowed."""
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            if all(not line.strip() for line in lines[i:]):
                break
            raise DataError(path, f"line {i + 1}: blank line where an atom count was expected",
                            frame=len(spans), field="natoms")
        natoms = _atom_count(path, lines[i], i, len(spans))
        missing = i + 2 + natoms - len(lines)
        if missing > 0:
            raise DataError(path, f"file ends {missing} line(s) short of the {natoms} atoms announced "
                            f"on line {i + 1}", frame=len(spans), field="natoms")
        spans.append((i, natoms))
        i += natoms + 2
    return spans


def _atom_count(path: Path, line: str, i: int, frame: int) -> int:
    tokens = line.split()
    if len(tokens) != 1 or not tokens[0].isdigit() or int(tokens[0]) < 1:
        raise DataError(path, f"line {i + 1}: expected a positive atom count, got {line.strip()[:60]!r}",
                        frame=frame, field="natoms")
    return int(tokens[0])


def _parse_frame(path: Path, lines: list[str], first: int, natoms: int, k: int) -> Atoms:
    """Check one frame's text, then have ASE parse it; any ASE error becomes DataError(frame=k)."""
    comment, atom_lines = lines[first + 1], lines[first + 2:first + 2 + natoms]
    properties = _properties(path, comment, k)
    _check_atom_lines(path, atom_lines, properties, first + 3, k)
    try:
        return next(read_xyz(StringIO("\n".join(lines[first:first + 2 + natoms]) + "\n"), 0))
    except Exception as err:  # noqa: BLE001 — ASE raises many types; all mean "malformed frame"
        raise DataError(path, f"malformed frame: {type(err).__name__}: {err}", frame=k) from err


def _properties(path: Path, comment: str, k: int) -> list[tuple[str, str, int]]:
    """[(name, type letter, width)] from the comment line's Properties= key (pbc checked on the way)."""
    try:
        info = key_val_str_to_dict(comment)
    except Exception as err:  # noqa: BLE001
        raise DataError(path, f"malformed comment line: {err}", frame=k, field="comment") from None
    pbc = info.get("pbc")
    # ASE turns any unparsable pbc string into all-True; a wrong pbc silently changes the physics.
    if pbc is not None and not (isinstance(pbc, (list, np.ndarray)) and len(pbc) == 3
                                and all(isinstance(p, (bool, np.bool_)) for p in pbc)):
        raise DataError(path, f"pbc={pbc!r}: expected three of T/F", frame=k, field="pbc")
    spec = info.get("Properties", DEFAULT_PROPERTIES)
    parts = str(spec).split(":")
    try:
        props = [(parts[j], parts[j + 1], int(parts[j + 2])) for j in range(0, len(parts), 3)]
    except (IndexError, ValueError):
        raise DataError(path, f"malformed Properties={spec!r}", frame=k, field="Properties") from None
    if len(parts) % 3 or any(kind not in PROPERTY_PARSERS or width < 1 for _, kind, width in props):
        raise DataError(path, f"malformed Properties={spec!r}", frame=k, field="Properties")
    return props


def _check_atom_lines(path: Path, atom_lines: list[str], props: list[tuple[str, str, int]],
                      first_lineno: int, k: int) -> None:
    """Column count, numeric columns and element symbols of every atom line (ASE checks none fully)."""
    ncols = sum(width for _, _, width in props)
    columns = [(name, kind) for name, kind, width in props for _ in range(width)]
    for j, line in enumerate(atom_lines):
        tokens = line.split()
        where = f"line {first_lineno + j} (atom {j})"
        if len(tokens) != ncols:
            raise DataError(path, f"{where}: expected {ncols} columns for Properties "
                            f"{':'.join(f'{n}:{t}:{w}' for n, t, w in props)}, got {len(tokens)}",
                            frame=k, field="columns")
        for token, (name, kind) in zip(tokens, columns):
            if name == "species" and (token not in atomic_numbers or atomic_numbers[token] == 0):
                raise DataError(path, f"{where}: unknown element symbol {token!r}", frame=k, field="species")
            if kind in "RI":
                try:
                    PROPERTY_PARSERS[kind](token)
                except ValueError:
                    raise DataError(path, f"{where}: {token!r} is not a number", frame=k,
                                    field=ASE_NAMES.get(name, name)) from None
