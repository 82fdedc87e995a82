"""The separable attention's sums as one op with hand-written first and second derivatives.

Force training differentiates the energy twice, and autograd keeps every intermediate of both
passes until the loss's backward: a dozen line×D tensors per attention (gathers, scores, gates,
exponentials) and the entity projection's ten S×D parts, in each of the two graphs. This op
stores only its inputs — the entities (S×D), the line features, the line weights, the index and
the weights — and recomputes the rest in each pass: the projection (one matmul) and the per-line
terms, in chunks of `chunk` lines, so a pass's line-sized temporaries exist for one chunk at a
time. No pass records an autograd graph of its own: the forward, its vjp (the force backward)
and the vjp's vjp (the loss's backward through the force backward) are each one sweep.

The parts are P = entity·W_Pᵀ + b_P. One direction of the attention, per line x with segment s
(the entity it aggregates into) and other end t; a, p (at s), b, q, V (at t) are parts, ℓ_x the
line's features:

    z = a_s + b_t + W_z·ℓ_x    u = exp(z − m_s)    e = w_x·u          (m: the segment's max, a constant)
    g = p_s + q_t + W_g·ℓ_x    f = silu(g)         v = f·V_t
    num_s = Σ_x e·v            den_s = Σ_x e

vjp, given the cotangents N̄, D̄ of num, den (n = N̄_s, d = D̄_s per line):
    K = n·f·V_t + d   z̄ = K·e   ḡ = n·e·V_t·f'   V̄_t += n·e·f   w̄ = Σ_D K·u
z̄ reaches a_s, b_t, W_z, ℓ; ḡ reaches p_s, q_t, W_g, ℓ; the parts' gradient P̄ reaches the
entities (P̄·W_P) and W_P, b_P.

vjp of the vjp: with Z̃, G̃, Ṽ_t, w̃ the cotangents of z̄, ḡ, V̄_t, w̄ (P̃ = ẽ·W_Pᵀ from the entities'
cotangent ẽ, then Z̃ = ã_s + b̃_t + ℓ̃·W_zᵀ, …), ⟨cotangents, vjp⟩ = Σ_D u·Q per line,
Q = A·K + w·n·R, A = w·Z̃ + w̃, R = G̃·V_t·f' + Ṽ_t·f, whose derivatives are
    ∂/∂z = u·Q                            ∂/∂g = u·n·(f'·(A·V_t + w·Ṽ_t) + w·G̃·V_t·f'')
    ∂/∂V_t = u·n·(A·f + w·G̃·f')           ∂/∂w = Σ_D u·(Z̃·K + n·R)
    ∂/∂n = u·(A·f·V_t + w·R)              ∂/∂d = u·A
plus the direct terms of the weights the vjp multiplies by: ℓ̄ = Σ_k L̄_k·W_k (L̄ = z̄, ḡ) gives
W_k a gradient L̄ᵀ·ℓ̃, and ē = P̄·W_P gives W_P one P̄ᵀ·ẽ.
f' = σ(1 + g(1 − σ)), f'' = σ(1 − σ)(2 + g(1 − 2σ)).

A create_graph backward through the op (the force backward) returns no weight gradients: in
force training the first-order parameter gradient of the energy is never wanted (the loss's
backward supplies the parameter gradients), as in exaforce.model.recompute.

Shape legend: S entities, X lines, D channels, F line features, K the ten parts (P: 10·D columns).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

# Parts of the entity projection (SeparableAttention): at the source 0 score_0, 1 gate_0,
# 2 score_1, 3 gate_1, 4 value_1; at the target 5 score_0, 6 gate_0, 7 score_1, 8 gate_1, 9 value_0.
# Line terms W_k: 0 score_0, 1 gate_0, 2 score_1, 3 gate_1.
# Direction 0 aggregates into the source, direction 1 into the target.


class Direction(NamedTuple):
    segment_row: int  # row of index_2X holding the entity each line aggregates into
    a: int            # score part at the segment entity
    p: int            # gate part at the segment entity
    b: int            # score part at the other entity
    q: int            # gate part at the other entity
    value: int        # value part at the other entity
    line_score: int   # line term of the score
    line_gate: int    # line term of the gate


DIRECTIONS = (Direction(0, a=0, p=1, b=5, q=6, value=9, line_score=0, line_gate=1),
              Direction(1, a=7, p=8, b=2, q=3, value=4, line_score=2, line_gate=3))


class SegmentSums(NamedTuple):
    """The attention's per-segment sums in each direction and the maxima they were taken against
    (constants: no gradient)."""

    sums: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # num0, den0, num1, den1: S×D
    maxima: tuple[torch.Tensor, torch.Tensor]                             # max0, max1: S×D


class Inputs(NamedTuple):
    entity_SD: torch.Tensor
    entity_weight_PD: torch.Tensor    # W_P: the entity projection's weight (10·D × D) …
    entity_bias_P: torch.Tensor       # … and bias
    line_XF: torch.Tensor
    line_weight_4DF: torch.Tensor     # W_k: the line terms' weight (4·D × F)
    weight_X: torch.Tensor            # w: each line's cutoff weight
    index_2X: torch.Tensor            # (source, target) entity of each line


def fused_segment_sums(inputs: Inputs, chunk: int) -> SegmentSums:
    """The attention's sums (see the module docstring), differentiable twice."""
    if chunk <= 0:
        raise ValueError(f"chunk = {chunk}: must be > 0")
    num0, den0, num1, den1, max0, max1 = _Sums.apply(chunk, *inputs)
    return SegmentSums((num0, den0, num1, den1), (max0, max1))


def segment_max(score_XD: torch.Tensor, segment_X: torch.Tensor, running_SD: torch.Tensor) -> torch.Tensor:
    """running_SD (start: zeros) raised in place to the per-channel max of each segment's scores: a
    constant of the softmax (no gradient), ≥ 0 and 0 for empty segments, so exp(−max) never overflows."""
    return running_SD.scatter_reduce_(0, segment_X.unsqueeze(1).expand_as(score_XD), score_XD, "amax")


class _Operands:
    """The inputs as the sweeps read them: the parts by index, (K, S, D), and each line term's
    weight W_k as (4, D, F) and transposed, (4, F, D) — for the thin products of line features
    (F = 8 angle terms) BLAS is several times faster with its second operand transposed, so
    ℓ·W_kᵀ reads KDF and L̄·W_k reads KFD."""

    def __init__(self, inputs: Inputs):
        self.inputs = inputs
        self.parts_SP = torch.nn.functional.linear(inputs.entity_SD, inputs.entity_weight_PD, inputs.entity_bias_P)
        self.width = inputs.entity_SD.shape[1]
        self.parts_KSD = self.parts_SP.view(-1, 10, self.width).transpose(0, 1)
        self.weight_KDF = inputs.line_weight_4DF.view(4, self.width, -1)
        self.weight_KFD = self.weight_KDF.transpose(1, 2).contiguous()

    def chunks(self, chunk: int) -> list[_Lines]:
        n_lines = self.inputs.index_2X.shape[1]
        return [_Lines(self, slice(lo, min(lo + chunk, n_lines))) for lo in range(0, n_lines, chunk)]


class _Lines:
    """One chunk of lines: its slice of the line inputs and its per-line terms."""

    def __init__(self, operands: _Operands, rows: slice):
        self.operands, self.rows = operands, rows
        inputs = operands.inputs
        self.line_XF, self.index_2X = inputs.line_XF[rows], inputs.index_2X[:, rows]
        self.weight_X1 = inputs.weight_X[rows].unsqueeze(1)

    @functools.cached_property
    def line_FX(self) -> torch.Tensor:
        return self.line_XF.T.contiguous()

    def gather(self, part_SD: torch.Tensor, row: int) -> torch.Tensor:
        return part_SD.index_select(0, self.index_2X[row])

    def line_term(self, k: int) -> torch.Tensor:
        return self.line_XF @ self.operands.weight_KDF[k].T

    def score(self, d: Direction) -> torch.Tensor:
        parts = self.operands.parts_KSD
        z_XD = self.gather(parts[d.a], d.segment_row)
        z_XD += self.gather(parts[d.b], 1 - d.segment_row)
        z_XD += self.line_term(d.line_score)
        return z_XD

    def terms(self, d: Direction, max_SD: torch.Tensor) -> dict[str, torch.Tensor]:
        """u = exp(z − m), e = w·u, g, σ(g), f = silu(g), f' and V_t of every line in the chunk."""
        parts = self.operands.parts_KSD
        u_XD = self.score(d)
        u_XD -= self.gather(max_SD, d.segment_row)
        u_XD.exp_()
        g_XD = self.gather(parts[d.p], d.segment_row)
        g_XD += self.gather(parts[d.q], 1 - d.segment_row)
        g_XD += self.line_term(d.line_gate)
        sigma_XD = torch.sigmoid(g_XD)
        return {"u": u_XD, "e": u_XD * self.weight_X1, "g": g_XD, "sigma": sigma_XD, "f": g_XD * sigma_XD,
                "fprime": sigma_XD * (1 + g_XD * (1 - sigma_XD)), "V": self.gather(parts[d.value], 1 - d.segment_row)}


def forward_sums(inputs: Inputs, chunk: int) -> tuple[torch.Tensor, ...]:
    """num0, den0, num1, den1, max0, max1: two sweeps (the maxima, then the sums)."""
    operands = _Operands(inputs)
    chunks = operands.chunks(chunk)
    n_entities = inputs.entity_SD.shape[0]
    maxima = [operands.parts_SP.new_zeros(n_entities, operands.width) for _ in DIRECTIONS]  # ≥ 0: exp(−m) ≤ 1
    for lines in chunks:
        for d, max_SD in zip(DIRECTIONS, maxima):
            segment_max(lines.score(d), lines.index_2X[d.segment_row], max_SD)
    sums = [operands.parts_SP.new_zeros(n_entities, operands.width) for _ in range(4)]
    for lines in chunks:
        for i, (d, max_SD) in enumerate(zip(DIRECTIONS, maxima)):
            t = lines.terms(d, max_SD)
            segment_X = lines.index_2X[d.segment_row]
            sums[2 * i].index_add_(0, segment_X, t["e"] * t["f"] * t["V"])
            sums[2 * i + 1].index_add_(0, segment_X, t["e"])
    return (*sums, *maxima)


class _Grads:
    """Gradient accumulators: of the parts, (K, S, D) (contiguous by part: scatters into strided
    rows are slower than one transposing copy at the end), of the line features and the line
    weights (the latter only when wanted), and of w."""

    def __init__(self, operands: _Operands, line_weights: bool):
        self.parts_KSD = operands.parts_KSD.new_zeros(operands.parts_KSD.shape)
        self.line_XF = torch.zeros_like(operands.inputs.line_XF)
        self.weight_KFD = torch.zeros_like(operands.weight_KFD) if line_weights else None
        self.weight_X = torch.zeros_like(operands.inputs.weight_X)

    def to_parts(self, d: Direction, lines: _Lines, score_XD: torch.Tensor, gate_XD: torch.Tensor,
                 value_XD: torch.Tensor) -> None:
        """Scatter per-line gradients of z, g and V_t to the parts they were gathered from."""
        segment_X, other_X = lines.index_2X[d.segment_row], lines.index_2X[1 - d.segment_row]
        for k, index_X, grad_XD in ((d.a, segment_X, score_XD), (d.b, other_X, score_XD),
                                    (d.p, segment_X, gate_XD), (d.q, other_X, gate_XD), (d.value, other_X, value_XD)):
            self.parts_KSD[k].index_add_(0, index_X, grad_XD)

    def to_line_term(self, lines: _Lines, k: int, grad_XD: torch.Tensor) -> None:
        """grad is the cotangent of line term k = ℓ·W_kᵀ."""
        self.line_XF[lines.rows].addmm_(grad_XD, lines.operands.weight_KFD[k].T)
        if self.weight_KFD is not None:
            self.weight_KFD[k].addmm_(lines.line_FX, grad_XD)

    @property
    def parts_SP(self) -> torch.Tensor:
        return self.parts_KSD.transpose(0, 1).reshape(self.parts_KSD.shape[1], -1)

    def line_weight_4DF(self) -> torch.Tensor | None:
        return None if self.weight_KFD is None else self.weight_KFD.transpose(1, 2).reshape(-1, self.weight_KFD.shape[1])


def vjp(inputs: Inputs, chunk: int, maxima, grad_sums, weights: bool) -> tuple[torch.Tensor | None, ...]:
    """Gradients of Σ⟨grad_sums, (num0, den0, num1, den1)⟩ for each of Inputs (the weights' None
    unless `weights`; the index's None)."""
    operands = _Operands(inputs)
    grads = _Grads(operands, line_weights=weights)
    for lines in operands.chunks(chunk):
        for i, (d, max_SD) in enumerate(zip(DIRECTIONS, maxima)):
            segment_X = lines.index_2X[d.segment_row]
            t = lines.terms(d, max_SD)
            n_XD = grad_sums[2 * i].index_select(0, segment_X)
            ne_XD = n_XD * t["e"]
            k_XD = n_XD * t["f"] * t["V"] + grad_sums[2 * i + 1].index_select(0, segment_X)
            grads.weight_X[lines.rows] += (k_XD * t["u"]).sum(1)
            zbar_XD, gbar_XD = k_XD * t["e"], ne_XD * t["V"] * t["fprime"]
            grads.to_parts(d, lines, zbar_XD, gbar_XD, ne_XD * t["f"])
            grads.to_line_term(lines, d.line_score, zbar_XD)
            grads.to_line_term(lines, d.line_gate, gbar_XD)
    parts_SP = grads.parts_SP
    entity_SD = parts_SP @ inputs.entity_weight_PD
    if not weights:
        return entity_SD, None, None, grads.line_XF, None, grads.weight_X, None
    return (entity_SD, parts_SP.T @ inputs.entity_SD, parts_SP.sum(0),
            grads.line_XF, grads.line_weight_4DF(), grads.weight_X, None)


def vjp_of_vjp(inputs: Inputs, chunk: int, maxima, grad_sums, grad_grad_entity_SD: torch.Tensor,
               grad_grad_line_XF: torch.Tensor, grad_grad_weight_X: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ⟨(ẽ, ℓ̃, w̃), vjp(…, grad_sums)⟩ (the vjp without weights) for each of Inputs
    and for the four cotangents grad_sums."""
    operands = _Operands(inputs)
    tilde_KSD = (grad_grad_entity_SD @ inputs.entity_weight_PD.T).view(-1, 10, operands.width).transpose(0, 1)
    first = _Grads(operands, line_weights=False)   # P̄, the vjp's parts gradient (for W_P's direct term)
    grads = _Grads(operands, line_weights=True)
    grad_sums_out = [torch.zeros_like(g) for g in grad_sums]
    for lines in operands.chunks(chunk):
        w_X1 = lines.weight_X1
        tilde_line_XF, tilde_w_X1 = grad_grad_line_XF[lines.rows], grad_grad_weight_X[lines.rows].unsqueeze(1)
        tilde_line_FX = tilde_line_XF.T.contiguous()
        for i, (d, max_SD) in enumerate(zip(DIRECTIONS, maxima)):
            segment_X, other_X = lines.index_2X[d.segment_row], lines.index_2X[1 - d.segment_row]
            t = lines.terms(d, max_SD)
            u_XD, f_XD, v_XD, fprime_XD = t["u"], t["f"], t["V"], t["fprime"]
            n_XD = grad_sums[2 * i].index_select(0, segment_X)
            fv_XD = f_XD * v_XD
            k_XD = n_XD * fv_XD + grad_sums[2 * i + 1].index_select(0, segment_X)
            ne_XD = n_XD * t["e"]
            zbar_XD, gbar_XD = k_XD * t["e"], ne_XD * v_XD * fprime_XD
            first.to_parts(d, lines, zbar_XD, gbar_XD, ne_XD * f_XD)
            # The direct terms of the line weights: ℓ̄ = Σ_k L̄_k·W_k.
            grads.weight_KFD[d.line_score].addmm_(tilde_line_FX, zbar_XD)
            grads.weight_KFD[d.line_gate].addmm_(tilde_line_FX, gbar_XD)
            # Cotangents of z̄, ḡ and V̄_t (each gathered from every place the vjp put them).
            ztil_XD = tilde_KSD[d.a].index_select(0, segment_X) + tilde_KSD[d.b].index_select(0, other_X) \
                + tilde_line_XF @ operands.weight_KDF[d.line_score].T
            gtil_XD = tilde_KSD[d.p].index_select(0, segment_X) + tilde_KSD[d.q].index_select(0, other_X) \
                + tilde_line_XF @ operands.weight_KDF[d.line_gate].T
            vtil_XD = tilde_KSD[d.value].index_select(0, other_X)
            a_XD = w_X1 * ztil_XD + tilde_w_X1
            r_XD = gtil_XD * v_XD * fprime_XD + vtil_XD * f_XD
            un_XD = u_XD * n_XD
            # Through z, g, V_t, w and the cotangents n, d.
            zhat_XD = u_XD * (a_XD * k_XD + w_X1 * n_XD * r_XD)
            fsecond_XD = t["sigma"] * (1 - t["sigma"]) * (2 + t["g"] * (1 - 2 * t["sigma"]))
            ghat_XD = un_XD * (fprime_XD * (a_XD * v_XD + w_X1 * vtil_XD) + w_X1 * gtil_XD * v_XD * fsecond_XD)
            vhat_XD = un_XD * (a_XD * f_XD + w_X1 * gtil_XD * fprime_XD)
            grads.weight_X[lines.rows] += (u_XD * (ztil_XD * k_XD + n_XD * r_XD)).sum(1)
            grad_sums_out[2 * i].index_add_(0, segment_X, u_XD * (a_XD * fv_XD + w_X1 * r_XD))
            grad_sums_out[2 * i + 1].index_add_(0, segment_X, u_XD * a_XD)
            grads.to_parts(d, lines, zhat_XD, ghat_XD, vhat_XD)
            grads.to_line_term(lines, d.line_score, zhat_XD)
            grads.to_line_term(lines, d.line_gate, ghat_XD)
    hat_SP = grads.parts_SP
    entity_weight_PD = hat_SP.T @ inputs.entity_SD + first.parts_SP.T @ grad_grad_entity_SD
    return (hat_SP @ inputs.entity_weight_PD, entity_weight_PD, hat_SP.sum(0), grads.line_XF,
            grads.line_weight_4DF(), grads.weight_X, None, *grad_sums_out)


class _Sums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chunk: int, *inputs):
        outputs = forward_sums(Inputs(*inputs), chunk)
        ctx.chunk = chunk
        ctx.save_for_backward(*inputs, *outputs[4:])
        ctx.mark_non_differentiable(*outputs[4:])
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        *inputs, max0_SD, max1_SD = ctx.saved_tensors
        grad_sums = grad_outputs[:4]
        if torch.is_grad_enabled():  # create_graph (the force backward): a recorded op, no weight gradients
            entity_SD, line_XF, weight_X = _SumsVJP.apply(ctx.chunk, max0_SD, max1_SD, *inputs, *grad_sums)
            return None, entity_SD, None, None, line_XF, None, weight_X, None
        return None, *vjp(Inputs(*inputs), ctx.chunk, (max0_SD, max1_SD), grad_sums, weights=True)


class _SumsVJP(torch.autograd.Function):
    """The op's force backward, recorded: its backward (the loss's backward through the force
    backward) is vjp_of_vjp."""

    @staticmethod
    def forward(ctx, chunk: int, max0_SD, max1_SD, *inputs_and_grad_sums):
        ctx.chunk = chunk
        ctx.save_for_backward(max0_SD, max1_SD, *inputs_and_grad_sums)
        inputs, grad_sums = Inputs(*inputs_and_grad_sums[:len(Inputs._fields)]), inputs_and_grad_sums[len(Inputs._fields):]
        entity_SD, _, _, line_XF, _, weight_X, _ = vjp(inputs, chunk, (max0_SD, max1_SD), grad_sums, weights=False)
        return entity_SD, line_XF, weight_X

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_entity_SD, grad_line_XF, grad_weight_X):
        max0_SD, max1_SD, *saved = ctx.saved_tensors
        inputs, grad_sums = Inputs(*saved[:len(Inputs._fields)]), saved[len(Inputs._fields):]
        return (None, None, None, *vjp_of_vjp(inputs, ctx.chunk, (max0_SD, max1_SD), grad_sums,
                                              grad_entity_SD, grad_line_XF, grad_weight_X))
