"""Predicted against reference labels, for the report's parity plots.

`exaforce predict --out RUN/predictions/NAME.bp` writes a dataset that records which dataset it
predicted (`predicted_from`) and with which head; `perf report RUN` pairs every such prediction
with its reference and reports energy-per-atom and force-component errors. The structures are
the whole reference dataset (training and held-out alike, unless the reference is a test set).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

PREDICTIONS = "predictions"     # RUN/predictions/*.bp
MAX_POINTS = 20_000             # force components drawn (a random, seeded subset beyond that)


def parity_of(run_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """One entry per prediction dataset under RUN/predictions (arrays for the plot, MAE and RMSE),
    and warnings for predictions that cannot be paired (reference gone or different)."""
    from exaforce.io.bp import is_dataset, open_bp

    entries, warnings = [], []
    for path in sorted((Path(run_dir) / PREDICTIONS).glob("*.bp")):
        try:  # a report is never lost to one bad file: each problem becomes a warning
            with open_bp(path) as predicted:
                reference_text = str(predicted.attrs.get("predicted_from", ""))
                pred = predicted.read(0, predicted.n_structures)
                head = str(predicted.attrs.get("head", "?"))
            reference_path = Path(reference_text)
            if not reference_text or not is_dataset(reference_path):
                warnings.append(f"{path}: its reference {reference_text or '(not recorded)'} is not a dataset here: "
                                "no parity plot")
                continue
            with open_bp(reference_path) as reference:
                ref = reference.read(0, reference.n_structures)
        except Exception as err:  # noqa: BLE001 — ADIOS2 and the schema check raise several types
            warnings.append(f"{path}: unreadable ({type(err).__name__}: {err}): no parity plot")
            continue
        if not (np.array_equal(pred.natoms_S, ref.natoms_S) and np.array_equal(pred.numbers_N, ref.numbers_N)):
            warnings.append(f"{path}: its structures differ from {reference_path}: no parity plot")
            continue
        entries.append(_entry(path.stem, head, reference_path, pred, ref))
    return entries, warnings


def _entry(name: str, head: str, reference: Path, pred: Any, ref: Any) -> dict[str, Any]:
    e_ref, e_pred = ref.energy_S / ref.natoms_S, pred.energy_S / pred.natoms_S
    f_ref, f_pred = ref.forces_N3.reshape(-1), pred.forces_N3.reshape(-1)
    shown = np.arange(len(f_ref))
    if len(shown) > MAX_POINTS:
        shown = np.sort(np.random.default_rng(0).choice(len(f_ref), MAX_POINTS, replace=False))
    return {"name": name, "head": head, "reference": str(reference), "structures": int(len(e_ref)),
            "energy_mae_mev_per_atom": 1e3 * float(np.abs(e_pred - e_ref).mean()),
            "energy_rmse_mev_per_atom": 1e3 * float(np.sqrt(((e_pred - e_ref) ** 2).mean())),
            "forces_mae_mev_per_a": 1e3 * float(np.abs(f_pred - f_ref).mean()),
            "forces_rmse_mev_per_a": 1e3 * float(np.sqrt(((f_pred - f_ref) ** 2).mean())),
            "ref_energy": e_ref.tolist(), "pred_energy": e_pred.tolist(),
            "ref_forces": f_ref[shown].tolist(), "pred_forces": f_pred[shown].tolist()}
