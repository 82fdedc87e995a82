"""The cutoff envelope keeps its precision in float32 up to the cutoff (issue 18: the expanded
polynomial was noise of ±6e-6 past r/r_c = 0.99 and negative past 0.9954), and forces near both
cutoffs agree between float32 and float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms

from exaforce.calculator import ExaforceCalculator
from exaforce.model.basis import polynomial_envelope

pytestmark = pytest.mark.physics


def expanded(x: torch.Tensor, p: int) -> torch.Tensor:
    """DimeNet's eq. 8 as written (the reference in float64)."""
    xp = x.pow(p)
    u = 1 - (p + 1) * (p + 2) / 2 * xp + p * (p + 2) * xp * x - p * (p + 1) / 2 * xp * x * x
    return torch.where(x < 1, u, torch.zeros_like(x))


def value_and_slope(x: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    u = polynomial_envelope(x, p)
    (slope,) = torch.autograd.grad(u.sum(), x)
    return u.detach(), slope


@pytest.mark.parametrize("p", [5, 6, 8])
def test_the_factored_form_is_dimenets_envelope(p):
    x = torch.linspace(0, 1.2, 12001, dtype=torch.float64)
    u, slope = value_and_slope(x, p)
    torch.testing.assert_close(u, expanded(x, p), rtol=0, atol=1e-13)
    x_ref = x.detach().requires_grad_(True)
    (slope_ref,) = torch.autograd.grad(expanded(x_ref, p).sum(), x_ref)
    torch.testing.assert_close(slope, slope_ref, rtol=0, atol=1e-11)
    assert float(u[x >= 1].abs().max()) == 0.0 and float(slope[x >= 1].abs().max()) == 0.0


@pytest.mark.parametrize("p", [5, 6, 8])
def test_float32_keeps_precision_up_to_the_cutoff(p):
    x32 = torch.linspace(0.98, 1.0, 4001, dtype=torch.float32)[:-1]
    u32, slope32 = value_and_slope(x32, p)
    u64, slope64 = value_and_slope(x32.double(), p)
    assert float((u32.double() - u64).abs().max()) < 1e-9
    assert float((u32.double() / u64 - 1).abs().max()) < 1e-4  # relative, even where u ~ 1e-15
    assert float((slope32.double() - slope64).abs().max()) < 1e-7
    assert bool((u32 >= 0).all())


@pytest.mark.parametrize("which", ["cutoff", "three_body_cutoff"])
def test_dimer_and_trimer_forces_near_the_cutoffs_agree_in_float32(which):
    """Forces within 1e-4 eV/Å of float64 for r/r_c in [0.98, 1) (issue 18, acceptance 3)."""
    calcs = {dtype: ExaforceCalculator.from_preset("small", dtype=dtype, elements=("Cu",)) for dtype in
             ("float32", "float64")}
    r_c = getattr(calcs["float64"].model.cfg, which)
    worst = 0.0
    for x in np.linspace(0.98, 0.9999, 25):
        r = x * r_c
        # dimer at r; for the three-body cutoff a trimer whose two bonds from atom 0 have length r
        positions = [[0, 0, 0], [r, 0, 0]] + ([[0, r, 0]] if which == "three_body_cutoff" else [])
        forces = {}
        for dtype, calc in calcs.items():
            atoms = Atoms(f"Cu{len(positions)}", positions=positions)
            atoms.calc = calc
            forces[dtype] = atoms.get_forces()
        worst = max(worst, float(np.abs(forces["float32"] - forces["float64"]).max()))
    assert worst < 1e-4, worst


def force_curve(calc: ExaforceCalculator, which: str, xs: np.ndarray) -> np.ndarray:
    """The force along the bond that crosses the cutoff: a dimer at r (cutoff), or a trimer whose
    third atom's bond to atom 0 has length r at 109° from a 2.4 Å bond (three-body cutoff)."""
    r_c = getattr(calc.model.cfg, which)
    forces = []
    for r in xs * r_c:
        positions = [[0, 0, 0], [r, 0, 0]] if which == "cutoff" else \
            [[0, 0, 0], [2.4, 0, 0], [r * np.cos(1.9), r * np.sin(1.9), 0]]
        atoms = Atoms(f"Cu{len(positions)}", positions=positions)
        atoms.calc = calc
        unit = np.asarray(positions[-1], dtype=float) / r
        forces.append(float(atoms.get_forces()[-1] @ unit))
    return np.array(forces)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("which", ["cutoff", "three_body_cutoff"])
def test_force_curves_are_no_steeper_near_the_cutoff(which, seed):
    """max |dF/dr| over the last 10 % before a cutoff ≤ 3× its max over 2.3 Å … 0.9·r_c (issue 18:
    the messages' norm undid the envelope, and the dimer's ratio was 44–131 on these seeds; now
    0.6–1.9 for the dimer, 0.1–1.0 for the trimer)."""
    calc = ExaforceCalculator.from_preset("demo", seed=seed, dtype="float64", elements=("Cu",))
    r_c = getattr(calc.model.cfg, which)
    xs = np.linspace(2.3 / r_c, 0.9999, 300)
    slope = np.abs(np.gradient(force_curve(calc, which, xs), xs * r_c))
    near = xs >= 0.9
    ratio = slope[near].max() / slope[~near].max()
    assert ratio <= 3.0, f"{which}: max |dF/dr| near the cutoff {slope[near].max():.3g} is {ratio:.1f}x the rest's"
