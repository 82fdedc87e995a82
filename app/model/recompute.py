"""Recompute instead of store, exactly, through the double backward of force training.

Training on forces differentiates the energy twice: the force backward runs with create_graph, and
the loss's backward then runs through that backward's graph. Stored, both graphs keep every
intermediate of every block alive at once. `recompute(fn, inputs, params)` keeps only `fn`'s
inputs instead:

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
from dataclasses import dataclass, field

import torch

from exaforce.device import release_freed_host_memory
from exaforce.model.fused_attention import Scratch

Tensors = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Recompute:
    """How a training step trades compute for memory (run.recompute_lines, run.recompute_bonds):
    the fused attentions sweep `lines` lines at a time, and with `bonds` each block's line
    attention is recomputed with its bond update instead of storing its sums. With `geometry_lines`
    the triplets' geometry features (angle basis, three-body weight: a few dozen line-sized
    intermediates of elementwise ops) are recomputed in units of that many triplets instead of stored
    (inference of large cells, where they are most of the memory; 0: stored). None instead of a
    plan: plain autograd, every intermediate stored (the reference). One plan per step: its scratch
    buffers live as long as the step."""

    lines: int
    bonds: bool = True
    geometry_lines: int = 0
    release_host_memory: bool = False  # run.release_host_memory on a CPU: release_freed_memory trims the heap
    scratch: Scratch = field(default_factory=Scratch, compare=False)  # the fused attentions' work buffers

    @classmethod
    def from_run(cls, recompute_lines: int, recompute_bonds: bool, store_all_below: int = 0,
                 line_channels: int = 0, geometry_lines: int = 0, release_host_memory: bool = False) -> Recompute | None:
        """The plan for one micro-batch: None (plain) when recompute_lines is 0, or when the batch's
        line graph is small enough to store (line_channels = triplets × width × blocks below
        store_all_below; the caller passes 0 where every rank must take the same path)."""
        if not recompute_lines or line_channels < store_all_below:
            return None
        return cls(recompute_lines, recompute_bonds, geometry_lines, release_host_memory)

    def release_freed_memory(self) -> None:
        """Called where a unit's or a fused pass's temporaries were just freed (exaforce.device)."""
        if self.release_host_memory:
            release_freed_host_memory()


def recompute(fn: Callable[..., Tensors], inputs: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
              release: Callable[[], None] = lambda: None) -> Tensors:
    """fn(*inputs) (a tuple of tensors), differentiable twice, storing inputs instead of intermediates.

    params: every trainable tensor fn reads by closure, so its gradient reaches it. release: called
    before each backward pass rebuilds the unit (the previous unit's graph is freed by then;
    Recompute.release_freed_memory)."""
    params = tuple(p for p in params if p.requires_grad)
    return _Recompute.apply(_Unit(fn, len(inputs), release), *inputs, *params)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(t.requires_grad)


@dataclass(frozen=True)
class _Unit:
    fn: Callable[..., Tensors]
    n_inputs: int
    release: Callable[[], None]

    def vjp(self, inputs: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
            grad_outputs: Sequence[torch.Tensor], param_grads: bool) -> list[torch.Tensor | None]:
        """Gradients of ⟨grad_outputs, fn(inputs)⟩ for every input (and parameter: param_grads)."""
        local = [_leaf(t) for t in inputs]
        return _grads(self.fn(*local), grad_outputs, local + (list(params) if param_grads else []), create_graph=False)

    def vjp_backward(self, inputs: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                     grad_outputs: Sequence[torch.Tensor], param_grads: bool,
                     grad_grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Gradients of ⟨grad_grads, vjp⟩ for every input, parameter and grad_output."""
        local = [_leaf(t) for t in inputs]
        local_grad_outputs = [_leaf(g).requires_grad_(True) for g in grad_outputs]
        with torch.enable_grad():
            first = _grads(self.fn(*local), local_grad_outputs, local + (list(params) if param_grads else []),
                           create_graph=True)
            return _grads(first, grad_grads, local + list(params) + local_grad_outputs, create_graph=False)


def _grads(outputs: Sequence[torch.Tensor | None], grad_outputs: Sequence[torch.Tensor | None],
           wrt: Sequence[torch.Tensor], create_graph: bool) -> list[torch.Tensor | None]:
    """autograd.grad of Σ⟨grad_outputs, outputs⟩ for each of wrt (None: no path or no grad wanted)."""
    pairs = [(y, g) for y, g in zip(outputs, grad_outputs) if y is not None and g is not None and y.requires_grad]
    targets = [t for t in wrt if t.requires_grad]
    if not pairs or not targets:
        return [None] * len(wrt)
    grads = iter(torch.autograd.grad([y for y, _ in pairs], targets, [g for _, g in pairs],
                                     create_graph=create_graph, allow_unused=True))
    return [next(grads) if t.requires_grad else None for t in wrt]


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, unit: _Unit, *tensors):
        ctx.unit = unit
        ctx.save_for_backward(*tensors)
        with torch.no_grad():
            return tuple(unit.fn(*tensors[:unit.n_inputs]))

    @staticmethod
    def backward(ctx, *grad_outputs):
        tensors = ctx.saved_tensors
        param_grads = not torch.is_grad_enabled()  # create_graph: the force backward wants input gradients only
        grads = _RecomputeVJP.apply(ctx.unit, len(tensors), param_grads, *tensors, *grad_outputs)
        return (None, *grads)


class _RecomputeVJP(torch.autograd.Function):
    """The force backward of a recomputed unit, as an op of its own: its backward (the loss's
    backward through the force backward) recomputes the unit and its vjp with create_graph."""

    @staticmethod
    def forward(ctx, unit: _Unit, n_tensors: int, param_grads: bool, *tensors_and_grads):
        ctx.unit, ctx.n_tensors, ctx.param_grads = unit, n_tensors, param_grads
        ctx.save_for_backward(*tensors_and_grads)
        inputs, params = tensors_and_grads[:unit.n_inputs], tensors_and_grads[unit.n_inputs:n_tensors]
        unit.release()
        with torch.enable_grad():
            grads = unit.vjp(inputs, params, tensors_and_grads[n_tensors:], param_grads)
        # Unused inputs get zeros, not None: the force backward sums them with other paths.
        return (*(g if g is not None else torch.zeros_like(t) for g, t in zip(grads, inputs)),
                *(grads[unit.n_inputs:] if param_grads else [None] * len(params)))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_grads):
        saved, unit, n_tensors = ctx.saved_tensors, ctx.unit, ctx.n_tensors
        inputs, params = saved[:unit.n_inputs], saved[unit.n_inputs:n_tensors]
        unit.release()
        result = unit.vjp_backward(inputs, params, saved[n_tensors:], ctx.param_grads, grad_grads)
        return (None, None, None, *result)
