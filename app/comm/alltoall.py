"""The differentiable variable-split all-to-all that moves tokens to the ranks holding their experts.

Its backward is the same all-to-all with send and receive splits swapped, issued through the
autograd Function again (never as a raw collective), so a double backward — needed when forces
are trained, since they are themselves gradients — is exact. Every rank issues every call in the
same order, zero-size splits included. Split sizes are plain Python ints known at batch time.

Shapes: X rows (tokens) × D channels; CPU tensors through mpi4py (NumPy views, no copies).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch


@dataclass
class CommClock:
    """Seconds spent inside the all-to-all collective (forward and every backward), for the perf log."""

    seconds: float = 0.0
    calls: int = 0


def _alltoallv(x_XD: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int], comm: Any,
               clock: CommClock | None) -> torch.Tensor:

    if x_XD.shape[0] != sum(send_splits):
        raise ValueError(f"all_to_all: {x_XD.shape[0]} rows but send splits sum to {sum(send_splits)}")
    x_XD = x_XD.detach().contiguous()
    row = int(np.prod(x_XD.shape[1:], dtype=np.int64))
    out = torch.empty((sum(recv_splits), *x_XD.shape[1:]), dtype=x_XD.dtype)
    send_counts = np.asarray(send_splits, dtype=np.int64) * row
    recv_counts = np.asarray(recv_splits, dtype=np.int64) * row
    send_displs = np.concatenate([[0], np.cumsum(send_counts)[:-1]])
    recv_displs = np.concatenate([[0], np.cumsum(recv_counts)[:-1]])
    t0 = time.perf_counter()
    comm.Alltoallv([x_XD.numpy().reshape(-1), (send_counts, send_displs)],
                   [out.numpy().reshape(-1), (recv_counts, recv_displs)])  # collective
    if clock is not None:
        clock.seconds += time.perf_counter() - t0
        clock.calls += 1
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_XD: torch.Tensor, send_splits: tuple[int, ...], recv_splits: tuple[int, ...], comm: Any,
                clock: CommClock | None):
        ctx.send_splits, ctx.recv_splits, ctx.comm, ctx.clock = send_splits, recv_splits, comm, clock
        return _alltoallv(x_XD, send_splits, recv_splits, comm, clock)

    @staticmethod
    def backward(ctx, grad_YD: torch.Tensor):
        # Through the Function again: under create_graph this backward is itself differentiable.
        return all_to_all(grad_YD, ctx.recv_splits, ctx.send_splits, ctx.comm, ctx.clock), None, None, None, None


def all_to_all(x_XD: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int], comm: Any,
               clock: CommClock | None = None) -> torch.Tensor:
    """Rows [Σ send_splits[:r], +send_splits[r]) go to rank r; the result holds recv_splits[r] rows from rank r."""
    if len(send_splits) != comm.Get_size() or len(recv_splits) != comm.Get_size():
        raise ValueError(f"all_to_all: {len(send_splits)} send / {len(recv_splits)} receive splits "
                         f"for a communicator of {comm.Get_size()} ranks")
    return _AllToAll.apply(x_XD, tuple(int(s) for s in send_splits), tuple(int(s) for s in recv_splits), comm, clock)
