"""A Config written back as TOML, for benchmarks that launch `exaforce train --config FILE`.

The writer knows only what `Config.to_dict()` holds: tables of strings, numbers, booleans, lists
of them, and lists of tables (`[[data.datasets]]`); `exaforce.config.load` of the file gives the
same Config back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from exaforce.config import Config


def write_config(cfg: Config, path: Path) -> None:
    path.write_text(toml_text(cfg.to_dict()), encoding="utf-8")


def toml_text(sections: dict[str, dict[str, Any]]) -> str:
    """`[section]` tables of plain values, each followed by its arrays of tables."""
    lines: list[str] = []
    for section, fields in sections.items():
        lines += [f"[{section}]", *(f"{k} = {_value(v)}" for k, v in fields.items() if not _is_tables(v)), ""]
        for key, tables in fields.items():
            if _is_tables(tables):
                for table in tables:
                    lines += [f"[[{section}.{key}]]", *(f"{k} = {_value(v)}" for k, v in table.items()), ""]
    return "\n".join(lines)


def _is_tables(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, dict) for v in value)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # Python's float repr (1e-05, inf, nan) is valid TOML
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return f"[{', '.join(_value(v) for v in value)}]"
    raise TypeError(f"{value!r}: no TOML form for {type(value).__name__}")
