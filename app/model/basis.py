"""Radial and angular bases. Everything that depends on a distance goes smoothly to zero at its cutoff."""

from __future__ import annotations

import math

import torch
from torch import nn


def polynomial_envelope(x: torch.Tensor, p: int) -> torch.Tensor:
    """DimeNet's envelope u(x) on x = r/r_c: u(1) = u'(1) = u''(1) = 0, zero beyond 1.

    Source: Gasteiger et al., DimeNet (ICLR 2020), eq. 8: u = 1 − (p+1)(p+2)/2·xᵖ + p(p+2)·xᵖ⁺¹ −
    p(p+1)/2·xᵖ⁺², evaluated in its factored form u = (1 − x)³·Σ_{k<p} C(k+2, 2)·xᵏ (the sum is the
    series of (1 − x)⁻³ cut after xᵖ⁻¹). The expanded form cancels three O(10–100) terms to a tiny
    value near the cutoff: in float32 it is noise of ±6e-6 past x = 0.99 and negative past 0.9954;
    the factored form keeps full relative precision up to x = 1.
    """
    one_minus_x = 1 - x.clamp(max=1.0)  # zero, with zero derivatives, at and beyond the cutoff
    x = x.clamp(max=1.0)
    series = torch.full_like(x, math.comb(p + 1, 2))
    for k in range(p - 2, -1, -1):  # Horner, highest power first
        series = series * x + math.comb(k + 2, 2)
    return one_minus_x.pow(3) * series


class BesselBasis(nn.Module):
    """sqrt(2/r_c)·sin(nπr/r_c)/r times the envelope: a smooth radial basis vanishing at r_c."""

    def __init__(self, cutoff: float, n_basis: int, envelope_p: int):
        super().__init__()
        self.cutoff = cutoff
        self.envelope_p = envelope_p
        self.register_buffer("freq_R", torch.arange(1, n_basis + 1, dtype=torch.get_default_dtype()) * math.pi)

    def envelope(self, r_E: torch.Tensor) -> torch.Tensor:
        return polynomial_envelope(r_E / self.cutoff, self.envelope_p)

    def forward(self, r_E: torch.Tensor) -> torch.Tensor:
        x_E1 = (r_E / self.cutoff).unsqueeze(-1)
        basis_ER = math.sqrt(2 / self.cutoff) * torch.sin(self.freq_R * x_E1) / r_E.unsqueeze(-1)
        return basis_ER * polynomial_envelope(x_E1, self.envelope_p)


def chebyshev_angle_basis(cos_T: torch.Tensor, n_basis: int) -> torch.Tensor:
    """T_k(cos θ), k = 0 … n−1, by the recurrence (no acos, so derivatives stay finite at θ = 0, π)."""
    terms = [torch.ones_like(cos_T), cos_T]
    for _ in range(2, n_basis):
        terms.append(2 * cos_T * terms[-1] - terms[-2])
    return torch.stack(terms[:n_basis], dim=-1)
