"""Hyperparameter searches: the trials of a search folder, read and ranked.

    summarize_search(search_dir) -> dict      trials with their parameters, objective and rank

A search folder (rendered by `exaforce jobs campaign --mode search`, exaforce.search) holds
`search.json` and one run folder per trial. The objective, lower is better, is the validation
force MAE at a trial's last validation, averaged over its heads (meV/Å), when every finished trial
validated; otherwise the mean training loss over the last tenth of its steps (said in the
summary). A trial that never ran, stopped early (no end record in its perf log) or diverged
(a non-finite objective) is listed, unranked, with the reason.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from .runlog import load_run
from .summary import summarize

SEARCH_FILE = "search.json"
SEARCH_SCHEMA = 1


def load_search(search_dir: Path) -> dict[str, Any]:
    path = Path(search_dir) / SEARCH_FILE
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("schema") != SEARCH_SCHEMA or not isinstance(manifest.get("trials"), list):
        raise ValueError(f"{path}: not a search manifest of schema {SEARCH_SCHEMA}")
    return manifest


def _trial(search_dir: Path, entry: dict[str, Any]) -> dict[str, Any]:
    row = {"name": entry["name"], "params": entry["params"], "run_dir": entry["run_dir"], "problem": None,
           "val_forces_mev_per_a": None, "val_energy_mev_per_atom": None, "late_loss": None, "steps": 0,
           "atoms_per_s": None}
    try:
        run = load_run(Path(search_dir) / entry["run_dir"])
        summary = summarize(run)
    except (FileNotFoundError, ValueError) as err:
        row["problem"] = str(err)
        return row
    steps = summary["steps"]
    if not steps:
        row["problem"] = "no step recorded"
        return row
    if not run.ends:  # a finished run (its steps, or its time budget) writes an end record
        row["problem"] = f"stopped early, after step {steps[-1]['step']} (no end record)"
    row["steps"], row["atoms_per_s"] = len(steps), summary["atoms_per_s"]
    late = steps[-max(1, len(steps) // 10):]
    row["late_loss"] = statistics.fmean(s["loss"]["total"] for s in late)
    validated = [s["val"] for s in steps if s.get("val")]
    if validated:
        row["val_forces_mev_per_a"] = statistics.fmean(m["forces_mev_per_a"] for m in validated[-1].values())
        row["val_energy_mev_per_atom"] = statistics.fmean(m["energy_mev_per_atom"] for m in validated[-1].values())
    if row["problem"] is None and not all(math.isfinite(v) for v in (row["late_loss"], row["val_forces_mev_per_a"])
                                          if v is not None):
        row["problem"] = "non-finite loss or validation error (diverged)"
    return row


def summarize_search(search_dir: Path) -> dict[str, Any]:
    manifest = load_search(search_dir)
    rows = [_trial(search_dir, t) for t in manifest["trials"]]
    ran = [r for r in rows if r["problem"] is None]
    by_validation = bool(ran) and all(r["val_forces_mev_per_a"] is not None for r in ran)
    key = "val_forces_mev_per_a" if by_validation else "late_loss"
    for r in rows:
        r["objective"] = r[key] if r["problem"] is None else None
    ranked = sorted(ran, key=lambda r: r["objective"])
    for rank, r in enumerate(ranked, start=1):
        r["rank"] = rank
    warnings = [f"trial {r['name']}: {r['problem']}" for r in rows if r["problem"]]
    return {"search_dir": str(search_dir), "config": manifest.get("config"), "sampler": manifest.get("sampler"),
            "space": manifest.get("space"), "objective": ("validation force MAE at the last validation, mean over "
                                                          "heads (meV/Å)" if by_validation else
                                                          "training loss, mean over the last tenth of the steps"),
            "trials": ranked + [r for r in rows if r["problem"]], "best": ranked[0]["name"] if ranked else None,
            "warnings": warnings}
