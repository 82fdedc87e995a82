"""The differentiable variable-split all-to-all that moves tokens to the ranks holding their experts.

Its backward is the same all-to-all with send and receive splits swapped, issued through the
autograd Function again (never as a raw collective), so a double backward — needed when forces
are trained, since they are themselves gradients — is exact. Every rank issues every call in the
same order, zero-size splits included. Split sizes are plain Python ints known at batch time.
The exchange itself is the backend's (`exaforce.comm.groups`): mpi4py, Horovod or torch.distributed.

Shapes: X rows (tokens) × D channels.
"""

from __future__ import annotations

import time
from typing import Protocol, Sequence

import torch

from exaforce.comm.groups import Group


class Clock(Protocol):
    """Where the seconds and bytes of the collective (forward and every backward) add up, for the
    perf log (exaforce.model.routing.DispatchClock)."""

    def record(self, seconds: float, sent_bytes: Sequence[int]) -> None: ...


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_XD: torch.Tensor, send_splits: tuple[int, ...], recv_splits: tuple[int, ...], group: Group,
                clock: Clock | None):
        ctx.send_splits, ctx.recv_splits, ctx.group, ctx.clock = send_splits, recv_splits, group, clock
        t0 = time.perf_counter()
        out = group.alltoallv(x_XD, send_splits, recv_splits)  # collective
        if clock is not None:
            row_bytes = x_XD.shape[1:].numel() * x_XD.element_size()
            clock.record(time.perf_counter() - t0, [s * row_bytes for s in send_splits])
        return out

    @staticmethod
    def backward(ctx, grad_YD: torch.Tensor):
        # Through the Function again: under create_graph this backward is itself differentiable.
        return all_to_all(grad_YD, ctx.recv_splits, ctx.send_splits, ctx.group, ctx.clock), None, None, None, None


def all_to_all(x_XD: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int], group: Group,
               clock: Clock | None = None) -> torch.Tensor:
    """Rows [Σ send_splits[:r], +send_splits[r]) go to group rank r; the result holds recv_splits[r] rows from rank r."""
    if len(send_splits) != group.size or len(recv_splits) != group.size:
        raise ValueError(f"all_to_all: {len(send_splits)} send / {len(recv_splits)} receive splits "
                         f"for a group of {group.size} ranks")
    return _AllToAll.apply(x_XD, tuple(int(s) for s in send_splits), tuple(int(s) for s in recv_splits), group, clock)
