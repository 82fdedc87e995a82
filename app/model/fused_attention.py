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

    z = a_s + b_t + W_z·ℓ_x    u = exp(z − m_s)    e = w_x·u          (m: a constant; z − m capped, see segment_max)
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

Inside a recomputed unit (exaforce.model.recompute; `in_unit`) the op runs three times on the same inputs:
the unit's forward (without grad), its force backward and its loss backward. The sums of the
first run are remembered (Scratch) and handed to the second, which forgets them; their maxima
serve the third too, which then needs one sweep (the sums) instead of two. The third run's force
backward is recorded only to be differentiated (recompute's vjp_backward never reads its values),
so its values are not computed: that pass costs the vjp of the vjp and no vjp.

Shape legend: S entities, X lines, D channels, F line features, K the ten parts (P: 10·D columns).
"""

from __future__ import annotations

import math
from collections.abc import Callable
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


def fused_segment_sums(inputs: Inputs, chunk: int, scratch: Scratch, in_unit: bool = False,
                       release: Callable[[], None] = lambda: None) -> SegmentSums:
    """The attention's sums (see the module docstring), differentiable twice; `chunk` lines per
    sweep step. `in_unit`: called inside a recomputed unit (exaforce.model.recompute), whose three
    passes share their work through `scratch` (its forward runs without grad and remembers).
    `release`: called before each backward sweep (Recompute.release_freed_memory)."""
    if chunk <= 0:
        raise ValueError(f"chunk = {chunk}: must be > 0")
    sweep = _Sweep(chunk, scratch, in_unit, remember=in_unit and not torch.is_grad_enabled(), release=release)
    num0, den0, num1, den1, max0, max1 = _Sums.apply(sweep, *inputs)
    return SegmentSums((num0, den0, num1, den1), (max0, max1))


SCORE_CAP = 30.0  # the most a line's score may exceed its segment's max m (see segment_max)
WEIGHT_FLOOR = math.exp(-SCORE_CAP)  # lines lighter than this do not set m


def segment_max(score_XD: torch.Tensor, weight_X: torch.Tensor, segment_X: torch.Tensor,
                running_SD: torch.Tensor) -> torch.Tensor:
    """running_SD (start: zeros) raised in place to m, the per-channel max over each segment's lines
    of z + log w, over lines with w ≥ WEIGHT_FLOOR: a constant of the softmax (no gradient), ≥ 0.

    Why: the softmax is exact for any constant m, but float32 holds exp only up to e^88. With m
    where w·exp(z) is largest, that line's term w·exp(z − m) is 1 and the denominator
    exp(−m) + Σ w·exp(z − m) is ≥ 1, even when the top-scoring line has weight 0 (a line at its
    cutoff) and the rest are far below it. A line lighter than the floor may then sit far above m;
    its exponent is capped at SCORE_CAP (clamped_scores), so exp stays ≤ e^30 in every derivative
    and w·exp(z − m) ≤ 1. The cap changes nothing for lines at or above the floor (their
    z − m ≤ −log w ≤ SCORE_CAP), and below it only lines within ~1e-13 of a cutoff weight."""
    log_weight_X = torch.log(weight_X).masked_fill(weight_X < WEIGHT_FLOOR, float("-inf"))
    return running_SD.scatter_reduce_(0, segment_X.unsqueeze(1).expand_as(score_XD),
                                      score_XD + log_weight_X.unsqueeze(1), "amax")


def clamped_scores(score_XD: torch.Tensor, max_XD: torch.Tensor) -> torch.Tensor:
    """z − m capped at SCORE_CAP (the plain path: autograd's clamp gives capped lines no score gradient,
    as the fused op's masks do)."""
    return (score_XD - max_XD).clamp(max=SCORE_CAP)


# --- one chunk of lines: pure functions of tensors (so a compiler can fuse each into a few loops)
# parts_SP: the entity projection, S × 10·D; index_2X, line_XF, weight_X: the chunk's lines;
# weight_KDF / weight_KFD: the line weights by term, (4, D, F) and its transpose (4, F, D) as a
# contiguous copy — for thin products of line features (F = 8 angle terms) BLAS is several times
# faster with its second operand transposed, so ℓ·W_kᵀ reads KDF and L̄·W_k reads KFD.
# Accumulators (sums, maxima, gradients) are S-row tensors the chunk adds into in place.


def _part(parts_SP: torch.Tensor, k: int, index_X: torch.Tensor) -> torch.Tensor:
    width = parts_SP.shape[1] // 10
    return parts_SP.view(parts_SP.shape[0], 10, width)[:, k].index_select(0, index_X)


def _score(parts_SP, line_XF, index_2X, weight_KDF, d: Direction) -> torch.Tensor:
    segment_X, other_X = index_2X[d.segment_row], index_2X[1 - d.segment_row]
    return _part(parts_SP, d.a, segment_X) + _part(parts_SP, d.b, other_X) + line_XF @ weight_KDF[d.line_score].T


def _terms(parts_SP, line_XF, index_2X, weight_X, weight_KDF, d: Direction, max_SD) -> dict[str, torch.Tensor | None]:
    """u = exp(min(z − m, SCORE_CAP)), e = w·u, g, σ(g), f = silu(g) and V_t of every line in the
    chunk, and the lines whose z is not capped ("free": None when no line of the chunk can be)."""
    segment_X, other_X = index_2X[d.segment_row], index_2X[1 - d.segment_row]
    z_XD = _score(parts_SP, line_XF, index_2X, weight_KDF, d) - max_SD.index_select(0, segment_X)
    free_XD = None
    # Only lines below the floor can exceed the cap. On the CPU a cheap check skips the mask when none
    # is; on an accelerator the check would be a device→host sync per chunk, so the mask is always applied.
    if weight_X.device.type != "cpu" or bool((weight_X < WEIGHT_FLOOR).any()):
        free_XD = z_XD <= SCORE_CAP
        z_XD = z_XD.clamp(max=SCORE_CAP)
    u_XD = torch.exp(z_XD)
    g_XD = _part(parts_SP, d.p, segment_X) + _part(parts_SP, d.q, other_X) + line_XF @ weight_KDF[d.line_gate].T
    sigma_XD = torch.sigmoid(g_XD)
    return {"u": u_XD, "e": u_XD * weight_X.unsqueeze(1), "g": g_XD, "sigma": sigma_XD, "f": g_XD * sigma_XD,
            "V": _part(parts_SP, d.value, other_X), "free": free_XD}


def _through_cap(t: dict[str, torch.Tensor | None], grad_XD: torch.Tensor) -> torch.Tensor:
    """A gradient with respect to the capped score, taken to z: zero on capped lines."""
    return grad_XD if t["free"] is None else grad_XD * t["free"]


def _silu_grad(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """f' = σ(1 + g(1 − σ))."""
    return t["sigma"] * (1 + t["g"] * (1 - t["sigma"]))


def _silu_second(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """f'' = σ(1 − σ)(2 + g(1 − 2σ))."""
    return t["sigma"] * (1 - t["sigma"]) * (2 + t["g"] * (1 - 2 * t["sigma"]))


def _to_parts(grad_KSD: torch.Tensor, index_2X: torch.Tensor, d: Direction, score_XD: torch.Tensor,
              gate_XD: torch.Tensor, value_XD: torch.Tensor) -> None:
    """Scatter per-line gradients of z, g and V_t to the parts they were gathered from."""
    segment_X, other_X = index_2X[d.segment_row], index_2X[1 - d.segment_row]
    for k, index_X, grad_XD in ((d.a, segment_X, score_XD), (d.b, other_X, score_XD),
                                (d.p, segment_X, gate_XD), (d.q, other_X, gate_XD), (d.value, other_X, value_XD)):
        grad_KSD[k].index_add_(0, index_X, grad_XD)


def chunk_max(parts_SP, line_XF, index_2X, weight_X, weight_KDF, max0_SD, max1_SD) -> None:
    for d, max_SD in zip(DIRECTIONS, (max0_SD, max1_SD)):
        segment_max(_score(parts_SP, line_XF, index_2X, weight_KDF, d), weight_X, index_2X[d.segment_row], max_SD)


def chunk_sums(parts_SP, line_XF, index_2X, weight_X, weight_KDF, max0_SD, max1_SD, *sums_SD) -> None:
    for i, (d, max_SD) in enumerate(zip(DIRECTIONS, (max0_SD, max1_SD))):
        t = _terms(parts_SP, line_XF, index_2X, weight_X, weight_KDF, d, max_SD)
        sums_SD[2 * i].index_add_(0, index_2X[d.segment_row], t["e"] * t["f"] * t["V"])
        sums_SD[2 * i + 1].index_add_(0, index_2X[d.segment_row], t["e"])


def chunk_vjp(parts_SP, line_XF, index_2X, weight_X, weight_KDF, weight_KFD, max0_SD, max1_SD,
              grad_sums: tuple[torch.Tensor, ...], grad_parts_KSD: torch.Tensor,
              grad_weight_KFD: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Adds the chunk's parts (and line-weight) gradients in place; returns its line-feature and
    w gradients."""
    grad_line_XF = torch.zeros_like(line_XF)
    grad_weight_X = torch.zeros_like(weight_X)
    for i, (d, max_SD) in enumerate(zip(DIRECTIONS, (max0_SD, max1_SD))):
        segment_X = index_2X[d.segment_row]
        t = _terms(parts_SP, line_XF, index_2X, weight_X, weight_KDF, d, max_SD)
        n_XD = grad_sums[2 * i].index_select(0, segment_X)
        ne_XD = n_XD * t["e"]
        k_XD = n_XD * t["f"] * t["V"] + grad_sums[2 * i + 1].index_select(0, segment_X)
        grad_weight_X = grad_weight_X + (k_XD * t["u"]).sum(1)
        zbar_XD, gbar_XD = _through_cap(t, k_XD * t["e"]), ne_XD * t["V"] * _silu_grad(t)
        _to_parts(grad_parts_KSD, index_2X, d, zbar_XD, gbar_XD, ne_XD * t["f"])
        for k, grad_XD in ((d.line_score, zbar_XD), (d.line_gate, gbar_XD)):
            grad_line_XF = grad_line_XF + grad_XD @ weight_KFD[k].T
            if grad_weight_KFD is not None:
                grad_weight_KFD[k].add_(line_XF.T @ grad_XD)
    return grad_line_XF, grad_weight_X


def chunk_vjp_of_vjp(parts_SP, line_XF, index_2X, weight_X, weight_KDF, weight_KFD, max0_SD, max1_SD,
                     grad_sums: tuple[torch.Tensor, ...], tilde_parts_SP, tilde_line_XF, tilde_weight_X,
                     first_KSD: torch.Tensor, grad_parts_KSD: torch.Tensor, grad_weight_KFD: torch.Tensor,
                     grad_sums_out: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Adds the chunk's part of the vjp's parts gradient P̄ (first_KSD), of the second-order
    parts, line-weight and grad_sums gradients in place; returns its line-feature and w gradients."""
    w_X1, tilde_w_X1 = weight_X.unsqueeze(1), tilde_weight_X.unsqueeze(1)
    grad_line_XF = torch.zeros_like(line_XF)
    grad_weight_X = torch.zeros_like(weight_X)
    for i, (d, max_SD) in enumerate(zip(DIRECTIONS, (max0_SD, max1_SD))):
        segment_X, other_X = index_2X[d.segment_row], index_2X[1 - d.segment_row]
        t = _terms(parts_SP, line_XF, index_2X, weight_X, weight_KDF, d, max_SD)
        u_XD, f_XD, v_XD, fprime_XD = t["u"], t["f"], t["V"], _silu_grad(t)
        n_XD = grad_sums[2 * i].index_select(0, segment_X)
        fv_XD = f_XD * v_XD
        k_XD = n_XD * fv_XD + grad_sums[2 * i + 1].index_select(0, segment_X)
        ne_XD = n_XD * t["e"]
        zbar_XD, gbar_XD = _through_cap(t, k_XD * t["e"]), ne_XD * v_XD * fprime_XD
        _to_parts(first_KSD, index_2X, d, zbar_XD, gbar_XD, ne_XD * f_XD)
        # The direct terms of the line weights: ℓ̄ = Σ_k L̄_k·W_k.
        grad_weight_KFD[d.line_score].add_(tilde_line_XF.T @ zbar_XD)
        grad_weight_KFD[d.line_gate].add_(tilde_line_XF.T @ gbar_XD)
        # Cotangents of z̄, ḡ and V̄_t (each gathered from every place the vjp put them).
        ztil_XD = _through_cap(t, _part(tilde_parts_SP, d.a, segment_X) + _part(tilde_parts_SP, d.b, other_X)
                               + tilde_line_XF @ weight_KDF[d.line_score].T)
        gtil_XD = _part(tilde_parts_SP, d.p, segment_X) + _part(tilde_parts_SP, d.q, other_X) \
            + tilde_line_XF @ weight_KDF[d.line_gate].T
        vtil_XD = _part(tilde_parts_SP, d.value, other_X)
        a_XD = w_X1 * ztil_XD + tilde_w_X1
        r_XD = gtil_XD * v_XD * fprime_XD + vtil_XD * f_XD
        un_XD = u_XD * n_XD
        # Through z, g, V_t, w and the cotangents n, d.
        zhat_XD = _through_cap(t, u_XD * (a_XD * k_XD + w_X1 * n_XD * r_XD))
        ghat_XD = un_XD * (fprime_XD * (a_XD * v_XD + w_X1 * vtil_XD) + w_X1 * gtil_XD * v_XD * _silu_second(t))
        vhat_XD = un_XD * (a_XD * f_XD + w_X1 * gtil_XD * fprime_XD)
        grad_weight_X = grad_weight_X + (u_XD * (ztil_XD * k_XD + n_XD * r_XD)).sum(1)
        grad_sums_out[2 * i].index_add_(0, segment_X, u_XD * (a_XD * fv_XD + w_X1 * r_XD))
        grad_sums_out[2 * i + 1].index_add_(0, segment_X, u_XD * a_XD)
        _to_parts(grad_parts_KSD, index_2X, d, zhat_XD, ghat_XD, vhat_XD)
        for k, grad_XD in ((d.line_score, zhat_XD), (d.line_gate, ghat_XD)):
            grad_line_XF = grad_line_XF + grad_XD @ weight_KFD[k].T
            grad_weight_KFD[k].add_(line_XF.T @ grad_XD)
    return grad_line_XF, grad_weight_X


# --- sweeps over all chunks


class _Operands(NamedTuple):
    parts_SP: torch.Tensor
    weight_KDF: torch.Tensor
    weight_KFD: torch.Tensor
    width: int


class _Known(NamedTuple):
    """Sums remembered from a recomputed unit's forward, for the same inputs' later passes."""
    inputs: Inputs                          # held, so their memory cannot be reused by other tensors meanwhile
    versions: tuple[int, ...]               # their version counters when remembered
    sums: tuple[torch.Tensor, ...] | None   # num0, den0, num1, den1, until the force backward takes them
    maxima: tuple[torch.Tensor, torch.Tensor]


def _versions(tensors: tuple[torch.Tensor, ...]) -> tuple[int, ...]:
    return tuple(t._version for t in tensors)


def _same(a: tuple[torch.Tensor, ...], versions: tuple[int, ...], b: tuple[torch.Tensor, ...]) -> bool:
    """`b` holds the values `a` held when its `versions` were read: the same memory and layout, no
    in-place change since (a detached view shares its base's version counter, so the versions must
    be the ones recorded then, not read from `a` now; the caller holds `a`, so its memory cannot
    have been freed and reused)."""
    return versions == _versions(b) and all(
        x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.stride() == y.stride() and x.dtype == y.dtype
        for x, y in zip(a, b))


class Scratch:
    """Entity-sized work buffers (S × 10·D: the parts, their gradients), reused across the op's calls
    instead of allocated afresh for each: fresh pages cost ~10× a refill on these VMs, and at the
    line graph's S these buffers are tens to hundreds of MB. Safe because calls never overlap and no
    buffer is returned. Also the sums remembered for recomputed units (see the module docstring).
    One per training step and micro-batch (exaforce.model.recompute.Recompute)."""

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._known: list[_Known] = []
        self._projected: dict[tuple, tuple[tuple[torch.Tensor, ...], tuple[int, ...]]] = {}  # parts buffer → (entity, W_P, b_P) it holds, their versions

    def projection(self, entity_SD: torch.Tensor, weight_PD: torch.Tensor, bias_P: torch.Tensor) -> torch.Tensor:
        """The parts P = entity·W_Pᵀ + b_P in their buffer, computed only if it holds other parts:
        a unit's loss backward runs three sweeps on the same entities."""
        shape = (entity_SD.shape[0], weight_PD.shape[0])
        source = (entity_SD, weight_PD, bias_P)
        key = ("parts", shape, entity_SD.dtype, entity_SD.device)
        parts_SP = self.get("parts", shape, entity_SD)
        if key not in self._projected or not _same(*self._projected[key], source):
            torch.addmm(bias_P, entity_SD, weight_PD.T, out=parts_SP)
            self._projected[key] = (source, _versions(source))
        return parts_SP

    def remember(self, inputs: Inputs, outputs: tuple[torch.Tensor, ...]) -> None:
        self._known.append(_Known(inputs, _versions(inputs), outputs[:4], outputs[4:]))

    def recall(self, inputs: Inputs) -> _Known | None:
        """What is known of these exact inputs (same memory, unchanged): the sums once (then only
        the maxima), the maxima once more (then nothing)."""
        for i, known in enumerate(self._known):
            if _same(known.inputs, known.versions, inputs):
                if known.sums is None:
                    del self._known[i]
                else:
                    self._known[i] = known._replace(sums=None)
                return known
        return None

    def get(self, role: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A buffer of uninitialised values, the same one for the same role, shape and dtype."""
        key = (role, tuple(shape), like.dtype, like.device)
        if key not in self._buffers:
            self._buffers[key] = like.new_empty(shape)
        return self._buffers[key]


def _operands(inputs: Inputs, scratch: Scratch) -> _Operands:
    entity_SD, weight_PD = inputs.entity_SD, inputs.entity_weight_PD
    width = weight_PD.shape[0] // 10  # the lines' channels (model.line_width), not necessarily the entities'
    weight_KDF = inputs.line_weight_4DF.view(4, width, -1)
    parts_SP = scratch.projection(entity_SD, weight_PD, inputs.entity_bias_P)
    return _Operands(parts_SP, weight_KDF, weight_KDF.transpose(1, 2).contiguous(), width)


def _chunks(inputs: Inputs, chunk: int) -> list[slice]:
    n_lines = inputs.index_2X.shape[1]
    return [slice(lo, min(lo + chunk, n_lines)) for lo in range(0, n_lines, chunk)]


def _parts_grad_KSD(op: _Operands, scratch: Scratch, role: str) -> torch.Tensor:
    """A parts-gradient accumulator, (K, S, D) contiguous by part (scatters into the strided
    columns of S × 10·D are slower than reading it part by part at the end), zeroed."""
    return scratch.get(role, (10, op.parts_SP.shape[0], op.width), op.parts_SP).zero_()


def _through_projection(grad_KSD: torch.Tensor, inputs: Inputs,
                        weights: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The parts gradient P̄ taken through P = entity·W_Pᵀ + b_P: the gradients of the entities and
    (weights) of W_P and b_P, part by part (no S × 10·D copy: at the peak of the loss's backward)."""
    entity_SD = torch.zeros_like(inputs.entity_SD)
    for grad_SD, weight_DD in zip(grad_KSD, inputs.entity_weight_PD.view(10, -1, entity_SD.shape[1])):
        entity_SD.addmm_(grad_SD, weight_DD)
    if not weights:
        return entity_SD, None, None
    return entity_SD, _outer_by_part(grad_KSD, inputs.entity_SD), grad_KSD.sum(1).reshape(-1)


def _outer_by_part(grad_KSD: torch.Tensor, right_SD: torch.Tensor) -> torch.Tensor:
    """Σ_s grad_k[s]ᵀ·right[s] for each part k, stacked as W_P is (10·D × D): one matmul per part
    into its row block (no 10 × S × D copy of `right`)."""
    out_PD = right_SD.new_empty(grad_KSD.shape[0] * grad_KSD.shape[2], right_SD.shape[1])
    for grad_SD, block_DD in zip(grad_KSD, out_PD.view(grad_KSD.shape[0], grad_KSD.shape[2], -1)):
        torch.mm(grad_SD.T, right_SD, out=block_DD)
    return out_PD


def forward_sums(inputs: Inputs, chunk: int, scratch: Scratch,
                 maxima: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """num0, den0, num1, den1, max0, max1: two sweeps (the maxima, then the sums), or one when the
    maxima are known."""
    op = _operands(inputs, scratch)
    n_entities = inputs.entity_SD.shape[0]
    if maxima is None:
        maxima = [op.parts_SP.new_zeros(n_entities, op.width) for _ in DIRECTIONS]  # ≥ 0: exp(−m) ≤ 1
        for r in _chunks(inputs, chunk):
            chunk_max(op.parts_SP, inputs.line_XF[r], inputs.index_2X[:, r], inputs.weight_X[r], op.weight_KDF,
                      *maxima)
    sums = [op.parts_SP.new_zeros(n_entities, op.width) for _ in range(4)]
    for r in _chunks(inputs, chunk):
        chunk_sums(op.parts_SP, inputs.line_XF[r], inputs.index_2X[:, r], inputs.weight_X[r], op.weight_KDF,
                     *maxima, *sums)
    return (*sums, *maxima)


def vjp(inputs: Inputs, chunk: int, scratch: Scratch, maxima, grad_sums,
        weights: bool) -> tuple[torch.Tensor | None, ...]:
    """Gradients of Σ⟨grad_sums, (num0, den0, num1, den1)⟩ for each of Inputs (the weights' None
    unless `weights`; the index's None)."""
    op = _operands(inputs, scratch)
    grad_KSD = _parts_grad_KSD(op, scratch, "grad")
    grad_weight_KFD = torch.zeros_like(op.weight_KFD) if weights else None
    grad_line_XF, grad_weight_X = torch.empty_like(inputs.line_XF), torch.empty_like(inputs.weight_X)
    for r in _chunks(inputs, chunk):
        grad_line_XF[r], grad_weight_X[r] = chunk_vjp(
            op.parts_SP, inputs.line_XF[r], inputs.index_2X[:, r], inputs.weight_X[r], op.weight_KDF, op.weight_KFD,
            *maxima, tuple(grad_sums), grad_KSD, grad_weight_KFD)
    entity_SD, entity_weight_PD, entity_bias_P = _through_projection(grad_KSD, inputs, weights)
    if not weights:
        return entity_SD, None, None, grad_line_XF, None, grad_weight_X, None
    return (entity_SD, entity_weight_PD, entity_bias_P, grad_line_XF,
            grad_weight_KFD.transpose(1, 2).reshape(-1, grad_weight_KFD.shape[1]), grad_weight_X, None)


def vjp_of_vjp(inputs: Inputs, chunk: int, scratch: Scratch, maxima, grad_sums, grad_grad_entity_SD: torch.Tensor,
               grad_grad_line_XF: torch.Tensor, grad_grad_weight_X: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ⟨(ẽ, ℓ̃, w̃), vjp(…, grad_sums)⟩ (the vjp without weights) for each of Inputs
    and for the four cotangents grad_sums."""
    op = _operands(inputs, scratch)
    tilde_parts_SP = torch.mm(grad_grad_entity_SD, inputs.entity_weight_PD.T,
                              out=scratch.get("tilde", op.parts_SP.shape, op.parts_SP))
    first_KSD = _parts_grad_KSD(op, scratch, "first")  # P̄, for W_P's direct term
    grad_KSD = _parts_grad_KSD(op, scratch, "grad")    # P̂
    grad_weight_KFD = torch.zeros_like(op.weight_KFD)
    grad_sums_out = tuple(torch.zeros_like(g) for g in grad_sums)
    grad_line_XF, grad_weight_X = torch.empty_like(inputs.line_XF), torch.empty_like(inputs.weight_X)
    for r in _chunks(inputs, chunk):
        grad_line_XF[r], grad_weight_X[r] = chunk_vjp_of_vjp(
            op.parts_SP, inputs.line_XF[r], inputs.index_2X[:, r], inputs.weight_X[r], op.weight_KDF, op.weight_KFD,
            *maxima, tuple(grad_sums), tilde_parts_SP, grad_grad_line_XF[r], grad_grad_weight_X[r],
            first_KSD, grad_KSD, grad_weight_KFD, grad_sums_out)
    entity_SD, entity_weight_PD, entity_bias_P = _through_projection(grad_KSD, inputs)
    entity_weight_PD += _outer_by_part(first_KSD, grad_grad_entity_SD)
    return (entity_SD, entity_weight_PD, entity_bias_P, grad_line_XF,
            grad_weight_KFD.transpose(1, 2).reshape(-1, grad_weight_KFD.shape[1]), grad_weight_X, None, *grad_sums_out)


class _Sweep(NamedTuple):
    chunk: int
    scratch: Scratch
    in_unit: bool   # inside a recomputed unit: its passes recall what its forward remembered
    remember: bool  # the unit's forward: its backward passes want these sums again
    release: Callable[[], None]  # before a backward sweep: hand freed host memory back


class _Sums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sweep: _Sweep, *inputs):
        known = sweep.scratch.recall(Inputs(*inputs)) if sweep.in_unit else None
        if known is not None and known.sums is not None:  # a recomputed unit's force backward
            outputs = (*known.sums, *known.maxima)
        else:
            outputs = forward_sums(Inputs(*inputs), sweep.chunk, sweep.scratch,
                                   None if known is None else known.maxima)
        if sweep.remember and known is None:
            sweep.scratch.remember(Inputs(*inputs), outputs)
        ctx.sweep = sweep
        ctx.vjp_values_read = known is None or known.sums is not None  # not in a recomputed unit's loss backward
        ctx.save_for_backward(*inputs, *outputs[4:])
        ctx.mark_non_differentiable(*outputs[4:])
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        *inputs, max0_SD, max1_SD = ctx.saved_tensors
        grad_sums = grad_outputs[:4]
        if torch.is_grad_enabled():  # create_graph (the force backward): a recorded op, no weight gradients
            entity_SD, line_XF, weight_X = _SumsVJP.apply(ctx.sweep, ctx.vjp_values_read, max0_SD, max1_SD,
                                                          *inputs, *grad_sums)
            return None, entity_SD, None, None, line_XF, None, weight_X, None
        return None, *vjp(Inputs(*inputs), ctx.sweep.chunk, ctx.sweep.scratch, (max0_SD, max1_SD), grad_sums,
                          weights=True)


class _SumsVJP(torch.autograd.Function):
    """The op's force backward, recorded: its backward (the loss's backward through the force
    backward) is vjp_of_vjp. Without values_read its outputs are zeros: the graph is wanted, not the values."""

    @staticmethod
    def forward(ctx, sweep: _Sweep, values_read: bool, max0_SD, max1_SD, *inputs_and_grad_sums):
        ctx.sweep = sweep
        ctx.save_for_backward(max0_SD, max1_SD, *inputs_and_grad_sums)
        inputs, grad_sums = Inputs(*inputs_and_grad_sums[:len(Inputs._fields)]), inputs_and_grad_sums[len(Inputs._fields):]
        if not values_read:
            return (torch.zeros_like(inputs.entity_SD), torch.zeros_like(inputs.line_XF),
                    torch.zeros_like(inputs.weight_X))
        sweep.release()
        entity_SD, _, _, line_XF, _, weight_X, _ = vjp(inputs, sweep.chunk, sweep.scratch, (max0_SD, max1_SD),
                                                       grad_sums, weights=False)
        return entity_SD, line_XF, weight_X

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_entity_SD, grad_line_XF, grad_weight_X):
        max0_SD, max1_SD, *saved = ctx.saved_tensors
        inputs, grad_sums = Inputs(*saved[:len(Inputs._fields)]), saved[len(Inputs._fields):]
        ctx.sweep.release()
        return (None, None, None, None, *vjp_of_vjp(inputs, ctx.sweep.chunk, ctx.sweep.scratch, (max0_SD, max1_SD),
                                                    grad_sums, grad_entity_SD, grad_line_XF, grad_weight_X))
