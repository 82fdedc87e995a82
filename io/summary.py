"""What `exaforce data inspect` shows: a dataset's size, chemistry, fidelity and label statistics.

Statistics come from the attributes stored at conversion (no data read); a schema-1 dataset,
which stored fewer, is read once to compute them.
"""

from __future__ import annotations

import os
from typing import Any

from exaforce.io.bp import OPTIONAL_VARIABLES, open_bp
from exaforce.io.stats import STAT_KEYS, label_stats


def summarize(path: str | os.PathLike) -> dict[str, Any]:
    """One JSON-ready dict describing the dataset at `path` (opening validates it)."""
    with open_bp(path) as ds:
        attrs = dict(ds.attrs)
        stats = {key: attrs[key] for key in STAT_KEYS if key in attrs}
        if len(stats) < len(STAT_KEYS):
            stats = label_stats(ds.read(0, ds.n_structures))
        optional = [var for var, (field, *_) in OPTIONAL_VARIABLES.items() if field in ds.optional]
        return {
            "path": str(path), "name": ds.name, "method": ds.method, "schema_version": ds.schema_version,
            "n_structures": ds.n_structures, "n_atoms": ds.n_atoms,
            "elements": str(attrs.get("elements", "")).split(),
            "energy_per_atom_mean": stats["energy_per_atom_mean"], "energy_per_atom_std": stats["energy_per_atom_std"],
            "energy_mean": stats["energy_mean"], "energy_std": stats["energy_std"],
            "force_rms": stats["force_rms"], "n_with_stress": stats["n_with_stress"],
            "optional_fields": optional, "attrs": attrs,
        }


def format_summary(info: dict[str, Any]) -> str:
    """The human table: one `label  value` line each, then every stored attribute."""
    n, with_stress = info["n_structures"], info["n_with_stress"]
    stress = ("all structures" if with_stress == n else "none" if with_stress == 0 else
              f"{with_stress} of {n} structures")
    rows = [
        ("dataset", info["path"]), ("name", info["name"]), ("method", info["method"]),
        ("schema version", info["schema_version"]), ("structures", f"{n:,}"), ("atoms", f"{info['n_atoms']:,}"),
        ("elements", " ".join(info["elements"])),
        ("energy/atom", f"{info['energy_per_atom_mean']:.6g} ± {info['energy_per_atom_std']:.6g} eV"),
        ("energy", f"{info['energy_mean']:.6g} ± {info['energy_std']:.6g} eV"),
        ("force RMS", f"{info['force_rms']:.6g} eV/Å"), ("stress", stress),
        ("optional fields", " ".join(info["optional_fields"]) or "none"),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    lines.append("attributes:")
    key_width = max((len(key) for key in info["attrs"]), default=0)
    lines += [f"  {key:<{key_width}} = {value}" for key, value in sorted(info["attrs"].items())]
    return "\n".join(lines)
