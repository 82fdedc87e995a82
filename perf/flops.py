"""FLOP accounting: count a callable's FLOPs once, fit per-count coefficients, predict every step.

torch.utils.flop_counter counts matmul-like ops (mm, bmm, addmm, convolution, attention), forward
and backward, including double backward through autograd.grad(create_graph=True). For an
interatomic potential those ops act on tensors whose leading dimension is the number of atoms,
edges or angles, so the FLOPs of a step are linear in the three counts:

    flops = const + c_a·atoms + c_e·edges + c_t·angles

The coefficients are fitted once, on a few calibration batches counted exactly, and each step then
costs four multiply-adds instead of a counter pass (the counter's dispatch overhead is large).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from torch.utils.flop_counter import FlopCounterMode, _FlopCounterMode

COEFFICIENT_KEYS = ("const", "atoms", "edges", "angles")


class _TotalFlopCounter(FlopCounterMode):
    """FlopCounterMode without its per-module breakdown: the module tracker's gradient hooks fail
    on the autograd.grad calls that recomputation (exaforce.model.recompute) nests inside a
    backward, and only the total is used here. Every counted op lands under "Global"."""

    def __enter__(self):
        self.flop_counts.clear()
        self.mode = _FlopCounterMode(self)
        self.mode.__enter__()
        return self

    def __exit__(self, *args):
        exited, self.mode = self.mode.__exit__(*args), None
        return exited


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs of the matmul-like ops that `fn()` runs (forward and any backward inside it,
    recomputed ones included)."""
    counter = _TotalFlopCounter(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def fit_flop_coefficients(samples: list[tuple[int, int, int, float]]) -> dict[str, float]:
    """Least-squares fit of flops = const + c_a·atoms + c_e·edges + c_t·angles.

    `samples` holds (atoms, edges, angles, flops) tuples. The counts must vary independently: at
    least 4 samples whose (1, atoms, edges, angles) rows span four dimensions, else the coefficients
    are not determined and ValueError says which column is at fault.
    """
    if len(samples) < len(COEFFICIENT_KEYS):
        raise ValueError(f"fit_flop_coefficients needs at least {len(COEFFICIENT_KEYS)} samples "
                         f"(atoms, edges, angles, flops) to determine {COEFFICIENT_KEYS}; got {len(samples)}")
    data = np.asarray(samples, dtype=np.float64)
    if data.ndim != 2 or data.shape[1] != 4:
        raise ValueError(f"samples must be (atoms, edges, angles, flops) tuples; got shape {data.shape}")
    if not np.all(np.isfinite(data)):
        raise ValueError("samples contain a non-finite value")
    design = np.column_stack([np.ones(len(data)), data[:, :3]])
    flops = data[:, 3]

    # Scale each column to unit max so that the rank test compares like with like
    # (edges can be 100× atoms, and the constant column is 1).
    scale = np.abs(design).max(axis=0)
    for key, s in zip(COEFFICIENT_KEYS, scale):
        if s == 0.0:
            raise ValueError(f"degenerate calibration: '{key}' is zero in every sample, so its "
                             f"coefficient is not determined; vary it across calibration batches")
    scaled = design / scale
    rank = np.linalg.matrix_rank(scaled)
    if rank < len(COEFFICIENT_KEYS):
        raise ValueError(f"degenerate calibration: the (1, atoms, edges, angles) rows of the {len(data)} "
                         f"samples span only {rank} of 4 dimensions (a count is constant or a linear "
                         f"combination of the others, e.g. edges = k·atoms); vary the counts independently")
    solution, *_ = np.linalg.lstsq(scaled, flops, rcond=None)
    return {key: float(c) for key, c in zip(COEFFICIENT_KEYS, solution / scale)}


def fit_in_span(samples: list[tuple[int, int, int, float]]) -> dict[str, float]:
    """The minimum-norm least-squares fit of the same model, for samples whose counts do not vary
    independently (a training set of one or two structures): exact on the counts the samples span,
    an extrapolation elsewhere."""
    data = np.asarray(samples, dtype=np.float64)
    design = np.column_stack([np.ones(len(data)), data[:, :3]])
    scale = np.where(np.abs(design).max(axis=0) > 0, np.abs(design).max(axis=0), 1.0)
    solution, *_ = np.linalg.lstsq(design / scale, data[:, 3], rcond=None)
    return {key: float(c) for key, c in zip(COEFFICIENT_KEYS, solution / scale)}


def predict_flops(coeffs: dict[str, float], atoms: int, edges: int, angles: int) -> float:
    """FLOPs of a step with these counts from fitted coefficients (keys as COEFFICIENT_KEYS)."""
    missing = set(COEFFICIENT_KEYS) - set(coeffs)
    if missing:
        raise KeyError(f"flop coefficients lack {sorted(missing)}; have {sorted(coeffs)}")
    return coeffs["const"] + coeffs["atoms"] * atoms + coeffs["edges"] * edges + coeffs["angles"] * angles
