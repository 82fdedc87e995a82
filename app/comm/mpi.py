"""Gradient reduction and parameter broadcast with mpi4py on CPU tensors.

Gradients are packed into one flat buffer (allocated once, reused every step: fresh memory is
expensive on the target VMs), reduced with one in-place Allreduce, and unpacked. mpi4py reads
and writes the tensor's memory directly through a NumPy view (no copies).
"""

from __future__ import annotations

from typing import Any

import torch


def _as_buffer(tensor: torch.Tensor) -> Any:
    """A NumPy view of the tensor's memory: mpi4py takes the MPI datatype from its dtype."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("MPI buffers must be contiguous CPU tensors")
    return tensor.detach().numpy()


class MPIGradReducer:
    """Averages the gradients of `params` over `comm` (every rank issues the same call)."""

    def __init__(self, params: list[torch.nn.Parameter], comm: Any):
        self.params = [p for p in params if p.requires_grad]
        self.comm = comm
        dtype = self.params[0].dtype
        self._flat = torch.zeros(sum(p.numel() for p in self.params), dtype=dtype)

    def reduce(self) -> None:
        from mpi4py import MPI

        offset = 0
        for p in self.params:
            n = p.numel()
            if p.grad is None:
                # A parameter unused on this rank's batch still takes part: ranks must agree.
                self._flat[offset:offset + n].zero_()
            else:
                self._flat[offset:offset + n].copy_(p.grad.reshape(-1))
            offset += n
        if self.comm.Get_size() > 1:
            self.comm.Allreduce(MPI.IN_PLACE, _as_buffer(self._flat), op=MPI.SUM)  # collective
            self._flat.div_(self.comm.Get_size())
        offset = 0
        for p in self.params:
            n = p.numel()
            if p.grad is None:
                p.grad = torch.empty_like(p)
            p.grad.copy_(self._flat[offset:offset + n].view_as(p))
            offset += n


def broadcast_parameters(module: torch.nn.Module, comm: Any, root: int = 0) -> None:
    """Makes every rank start from root's parameters and buffers."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        data = tensor.data
        if not data.is_contiguous():
            raise ValueError("parameters must be contiguous to broadcast")
        comm.Bcast(_as_buffer(data), root=root)  # collective
