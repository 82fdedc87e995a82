"""Recompute instead of store, exactly, through the double backward of force training.

Training on forces differentiates the energy twice: the force backward runs with create_graph, and
the loss's backward then runs through that backward's graph. Stored, both graphs keep every
intermediate of every block alive at once — hundreds of kB per triplet. `recompute(fn, inputs,
params)` keeps only `fn`'s inputs instead:

    forward            y = fn(x)                          saves x
    force backward     ḡ_x, ḡ_θ = vjp(fn)(x; ḡ_y)          a recorded op that saves x and ḡ_y only
    loss backward      d⟨γ, vjp⟩/d(x, θ, ḡ_y)              recomputes fn and its vjp with create_graph

Each stage rebuilds `fn`'s local graph, uses it and frees it, so the peak holds one unit's graph
at a time, not the model's. The derivatives are the same functions of the same values, so results
match the stored path to rounding (same ops; the tests check float64 to 1e-12).
`torch.utils.checkpoint` cannot do this: its recomputed backward is not itself recomputed, so
under create_graph it stores the whole backward graph again.

A backward with create_graph through a unit (the force backward) returns input gradients only:
in force training the first-order parameter gradient of the energy is never wanted, and the
parameter gradients of the loss come from the loss's backward.

`fn` must be deterministic (no dropout, no data-dependent control flow between passes); integer
indices, routing plans and other non-differentiable state reach it by closure. A unit may issue
collectives (the expert all-to-all): every rank recomputes the same units in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Tensors = tuple[torch.Tensor, ...]


def recompute(fn: Callable[..., Tensors], inputs: Sequence[torch.Tensor],
              params: Sequence[torch.Tensor]) -> Tensors:
    """fn(*inputs) (a tuple of tensors), differentiable twice, storing inputs instead of intermediates.

    params: every trainable tensor fn reads by closure, so its gradient reaches it."""
    params = tuple(p for p in params if p.requires_grad)
    return _Recompute.apply(fn, len(inputs), *inputs, *params)


def _split(tensors: Sequence[torch.Tensor], n_inputs: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Fresh leaves for the inputs (so fn's graph stops at them) and the parameters as they are."""
    inputs = [t.detach().requires_grad_(t.requires_grad) for t in tensors[:n_inputs]]
    return inputs, list(tensors[n_inputs:])


def _vjp(fn: Callable[..., Tensors], inputs: list[torch.Tensor], params: list[torch.Tensor],
         grad_outputs: Sequence[torch.Tensor], create_graph: bool) -> list[torch.Tensor | None]:
    """Gradients of ⟨grad_outputs, fn(inputs)⟩ for every input and parameter (None: no path)."""
    outputs = fn(*inputs)
    wrt = [t for t in inputs + params if t.requires_grad]
    pairs = [(y, g) for y, g in zip(outputs, grad_outputs) if y.requires_grad]
    grads = iter(torch.autograd.grad([y for y, _ in pairs], wrt, [g for _, g in pairs],
                                     create_graph=create_graph, allow_unused=True)) if pairs else iter([None] * len(wrt))
    return [next(grads) if t.requires_grad else None for t in inputs + params]


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, n_inputs, *tensors):
        ctx.fn, ctx.n_inputs = fn, n_inputs
        ctx.save_for_backward(*tensors)
        with torch.no_grad():
            return tuple(fn(*(t.detach() for t in tensors[:n_inputs])))

    @staticmethod
    def backward(ctx, *grad_outputs):
        tensors = ctx.saved_tensors
        param_grads = not torch.is_grad_enabled()  # create_graph: the force backward wants input gradients only
        grads = _RecomputeVJP.apply(ctx.fn, ctx.n_inputs, len(tensors), param_grads, *tensors, *grad_outputs)
        return (None, None, *grads)


class _RecomputeVJP(torch.autograd.Function):
    """The force backward of a recomputed unit, as an op of its own: its backward (the loss's
    backward through the force backward) recomputes the unit and its vjp with create_graph."""

    @staticmethod
    def forward(ctx, fn, n_inputs, n_tensors, param_grads, *tensors_and_grads):
        ctx.fn, ctx.n_inputs, ctx.n_tensors, ctx.param_grads = fn, n_inputs, n_tensors, param_grads
        ctx.save_for_backward(*tensors_and_grads)
        inputs, params = _split(tensors_and_grads[:n_tensors], n_inputs)
        with torch.enable_grad():
            grads = _vjp(fn, inputs, params if param_grads else [], tensors_and_grads[n_tensors:], create_graph=False)
        # Unused inputs get zeros, not None: the force backward sums them with other paths.
        return (*(g if g is not None else torch.zeros_like(t) for g, t in zip(grads, tensors_and_grads[:n_inputs])),
                *(grads[n_inputs:] if param_grads else [None] * len(params)))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_grads):
        saved = ctx.saved_tensors
        n_tensors = ctx.n_tensors
        inputs, params = _split(saved[:n_tensors], ctx.n_inputs)
        grad_outputs = [g.detach().requires_grad_(True) for g in saved[n_tensors:]]
        with torch.enable_grad():
            grads = _vjp(ctx.fn, inputs, params if ctx.param_grads else [], grad_outputs, create_graph=True)
            pairs = [(g, gg) for g, gg in zip(grads, grad_grads)
                     if g is not None and gg is not None and g.requires_grad]
            wrt = [t for t in inputs + params if t.requires_grad] + grad_outputs
            second = iter(torch.autograd.grad([g for g, _ in pairs], wrt, [gg for _, gg in pairs],
                                              allow_unused=True)) if pairs else iter([None] * len(wrt))
        result = [next(second) if t.requires_grad else None for t in inputs + params] + [next(second) for _ in grad_outputs]
        return (None, None, None, None, *result)
