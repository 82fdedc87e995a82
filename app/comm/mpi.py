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
    """Sums the gradients of `params` over `comm` and divides by `divisor` (every rank issues the same call).

    Dense parameters: comm = world, divisor = world size. Expert parameters: comm = their EDP group,
    divisor = world size too, because each expert's local gradient already holds the contributions
    of its whole EP group (they came back through the all-to-all); the result is the global mean.
    """

    def __init__(self, params: list[torch.nn.Parameter], comm: Any, divisor: int):
        self.params = [p for p in params if p.requires_grad]
        self.comm = comm
        self.divisor = divisor
        self._flat: torch.Tensor | None = None  # allocated on first use, reused every step

    def reduce(self) -> None:
        from mpi4py import MPI

        if not self.params:
            return
        if self.comm.Get_size() == 1:  # nothing to exchange: scale in place, no buffer
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                elif self.divisor != 1:
                    p.grad.div_(self.divisor)
            return
        if self._flat is None:
            self._flat = torch.zeros(sum(p.numel() for p in self.params), dtype=self.params[0].dtype)
        offset = 0
        for p in self.params:
            n = p.numel()
            if p.grad is None:
                # A parameter unused on this rank's batch still takes part: ranks must agree.
                self._flat[offset:offset + n].zero_()
            else:
                self._flat[offset:offset + n].copy_(p.grad.reshape(-1))
            offset += n
        self.comm.Allreduce(MPI.IN_PLACE, _as_buffer(self._flat), op=MPI.SUM)  # collective
        self._flat.div_(self.divisor)
        offset = 0
        for p in self.params:
            n = p.numel()
            if p.grad is None:
                p.grad = torch.empty_like(p)
            p.grad.copy_(self._flat[offset:offset + n].view_as(p))
            offset += n


def broadcast_tensors(tensors: list[torch.Tensor], comm: Any, root: int = 0) -> None:
    """Makes every rank of `comm` start from root's values (parameters, buffers)."""
    for tensor in tensors:
        data = tensor.data
        if not data.is_contiguous():
            raise ValueError("parameters must be contiguous to broadcast")
        comm.Bcast(_as_buffer(data), root=root)  # collective
