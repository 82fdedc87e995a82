"""The collectives the trainer needs, over the Topology's groups, for three interchangeable backends.

`comm.backend = mpi | horovod | torch` picks how tensors move: mpi4py on CPU buffers, Horovod
(process sets made from the Topology's groups), or torch.distributed (gloo on CPU; NCCL/RCCL/XCCL
on GPUs) with process groups made from the same groups. Host-side control (element counts, loss
sums, barriers) always goes through the Topology's MPI communicators.

A `Group` offers exactly what the trainer uses: an asynchronous in-place sum with a post-scale
(gradient buckets), the variable-split all-to-all (expert dispatch), and broadcast (initial
parameters). A group of one rank needs no backend at all (`SoloGroup`).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from exaforce.config import BACKENDS


class Handle(Protocol):
    def wait(self) -> None: ...


class Group(Protocol):
    backend: str
    size: int

    def allreduce_sum_async(self, flat: torch.Tensor, postscale: float, name: str) -> Handle:
        """flat ← postscale · Σ_ranks flat once `wait()` returns; every rank issues the same sequence."""

    def alltoallv(self, x_XD: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int]) -> torch.Tensor:
        """Rows [Σ send[:r], +send[r]) go to group rank r; returns recv[r] rows from each rank r, in rank order."""

    def broadcast_(self, tensor: torch.Tensor, root: int = 0) -> None:
        """tensor ← the value of group rank `root`."""


def _check_rows(x_XD: torch.Tensor, send_splits: Sequence[int]) -> None:
    if x_XD.shape[0] != sum(send_splits):
        raise ValueError(f"all_to_all: {x_XD.shape[0]} rows but send splits sum to {sum(send_splits)}")


@dataclass
class _Scale:
    """A finished (or synchronous) reduction: only the post-scale is left to apply at wait()."""

    flat: torch.Tensor
    postscale: float
    inner: Any = None  # the backend's request, waited on first

    def wait(self) -> None:
        if self.inner is not None:
            self.inner.wait()
        if self.postscale != 1.0:
            self.flat.mul_(self.postscale)


class SoloGroup:
    """A group of one rank: sums are the value itself, the all-to-all is a copy."""

    size = 1

    def __init__(self, backend: str):
        self.backend = backend

    def allreduce_sum_async(self, flat: torch.Tensor, postscale: float, name: str) -> Handle:
        return _Scale(flat, postscale)

    def alltoallv(self, x_XD, send_splits, recv_splits) -> torch.Tensor:
        _check_rows(x_XD, send_splits)
        return x_XD.detach().clone()

    def broadcast_(self, tensor: torch.Tensor, root: int = 0) -> None:
        return None


# ------------------------------------------------------------------------------------------ mpi
def gpu_aware_mpi(library_version: str, environ: dict[str, str]) -> bool:
    """Whether the MPI library reads device memory itself. mpi4py 4.1 has no query for it, so the
    library's own switches decide: Cray MPICH with MPICH_GPU_SUPPORT_ENABLED=1 (Frontier, Perlmutter:
    envs/*/env.sh), Open MPI with OMPI_MCA_opal_cuda_support=true, MVAPICH with MV2_USE_CUDA=1."""
    return (("CRAY MPICH" in library_version.upper() and environ.get("MPICH_GPU_SUPPORT_ENABLED") == "1")
            or ("OPEN MPI" in library_version.upper() and environ.get("OMPI_MCA_opal_cuda_support") == "true")
            or ("MVAPICH" in library_version.upper() and environ.get("MV2_USE_CUDA") == "1"))


def _buffer(tensor: torch.Tensor, gpu_aware: bool) -> Any:
    """What mpi4py reads and writes for a contiguous tensor: a NumPy view of host memory, or the
    device tensor itself (mpi4py takes its DLPack / CUDA array interface) when MPI is GPU-aware."""
    if not tensor.is_contiguous():
        raise ValueError("MPI buffers must be contiguous tensors")
    if tensor.device.type == "cpu":
        return tensor.detach().numpy()
    if not gpu_aware:
        raise ValueError(f"MPI buffer on {tensor.device}: this MPI is not GPU-aware; stage through the host")
    torch.accelerator.synchronize(tensor.device)  # MPI reads the memory outside torch's stream order
    return tensor.detach()


@dataclass
class _Staged:
    """A reduction of a device tensor through a pinned host copy: copied back at wait()."""

    device_flat: torch.Tensor
    host: _Scale

    def wait(self) -> None:
        self.host.wait()
        self.device_flat.copy_(self.host.flat, non_blocking=True)


class MPIGroup:
    """mpi4py. Device tensors go to MPI directly where it is GPU-aware (`gpu_aware_mpi`); elsewhere
    through pinned host buffers, staged per call: a reduction is copied to the host, reduced there
    and copied back at wait()."""

    backend = "mpi"

    def __init__(self, comm: Any, gpu_aware: bool = False):
        self.comm = comm
        self.size = comm.Get_size()
        self.gpu_aware = gpu_aware

    def _staged(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type != "cpu" and not self.gpu_aware

    def allreduce_sum_async(self, flat: torch.Tensor, postscale: float, name: str) -> Handle:
        from mpi4py import MPI

        if self._staged(flat):
            host = flat.to("cpu").pin_memory()
            return _Staged(flat, self.allreduce_sum_async(host, postscale, name))
        return _Scale(flat, postscale, self.comm.Iallreduce(MPI.IN_PLACE, _buffer(flat, self.gpu_aware), op=MPI.SUM))

    def alltoallv(self, x_XD, send_splits, recv_splits) -> torch.Tensor:
        _check_rows(x_XD, send_splits)
        if self._staged(x_XD):
            return self.alltoallv(x_XD.detach().to("cpu"), send_splits, recv_splits).to(x_XD.device)
        x_XD = x_XD.detach().contiguous()
        row = int(np.prod(x_XD.shape[1:], dtype=np.int64))
        out = x_XD.new_empty((sum(recv_splits), *x_XD.shape[1:]))
        send = np.asarray(send_splits, dtype=np.int64) * row
        recv = np.asarray(recv_splits, dtype=np.int64) * row
        self.comm.Alltoallv([_buffer(x_XD, self.gpu_aware).reshape(-1), (send, np.r_[0, np.cumsum(send)[:-1]])],
                            [_buffer(out, self.gpu_aware).reshape(-1), (recv, np.r_[0, np.cumsum(recv)[:-1]])])
        return out

    def broadcast_(self, tensor: torch.Tensor, root: int = 0) -> None:
        if self._staged(tensor):
            host = tensor.data.to("cpu")
            self.broadcast_(host, root)
            tensor.data.copy_(host)
            return
        self.comm.Bcast(_buffer(tensor.data, self.gpu_aware), root=root)


# -------------------------------------------------------------------------------------- horovod
class _HorovodHandle:
    def __init__(self, handle: Any):
        self.handle = handle

    def wait(self) -> None:
        import horovod.torch as hvd

        hvd.synchronize(self.handle)


class HorovodGroup:
    """A Horovod process set. Horovod negotiates by name, so in-flight names must be unique."""

    backend = "horovod"

    def __init__(self, process_set: Any, ranks: Sequence[int]):
        self.process_set = process_set
        self.ranks = tuple(ranks)
        self.size = len(ranks)

    def allreduce_sum_async(self, flat: torch.Tensor, postscale: float, name: str) -> Handle:
        import horovod.torch as hvd

        return _HorovodHandle(hvd.allreduce_async_(flat, name=name, op=hvd.Sum, postscale_factor=postscale,
                                                   process_set=self.process_set))

    def alltoallv(self, x_XD, send_splits, recv_splits) -> torch.Tensor:
        import horovod.torch as hvd

        _check_rows(x_XD, send_splits)
        out, received = hvd.alltoall(x_XD.detach().contiguous(), splits=torch.tensor(list(send_splits), dtype=torch.int32),
                                     process_set=self.process_set)
        if tuple(int(r) for r in received) != tuple(recv_splits):
            raise RuntimeError(f"horovod alltoall received splits {received.tolist()}, plan said {list(recv_splits)}")
        return out

    def broadcast_(self, tensor: torch.Tensor, root: int = 0) -> None:
        import horovod.torch as hvd

        hvd.broadcast_(tensor.data, root_rank=self.ranks[root], process_set=self.process_set)


# ---------------------------------------------------------------------------- torch.distributed
class _Work:
    def __init__(self, work: Any):
        self.work = work

    def wait(self) -> None:
        self.work.wait()


class TorchGroup:
    backend = "torch"

    def __init__(self, process_group: Any, ranks: Sequence[int]):
        self.process_group = process_group
        self.ranks = tuple(ranks)
        self.size = len(ranks)

    def allreduce_sum_async(self, flat: torch.Tensor, postscale: float, name: str) -> Handle:
        import torch.distributed as dist

        return _Scale(flat, postscale, _Work(dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.process_group,
                                                             async_op=True)))

    def alltoallv(self, x_XD, send_splits, recv_splits) -> torch.Tensor:
        import torch.distributed as dist

        _check_rows(x_XD, send_splits)
        out = x_XD.new_empty((sum(recv_splits), *x_XD.shape[1:]))
        dist.all_to_all_single(out, x_XD.detach().contiguous(), output_split_sizes=list(recv_splits),
                               input_split_sizes=list(send_splits), group=self.process_group)
        return out

    def broadcast_(self, tensor: torch.Tensor, root: int = 0) -> None:
        import torch.distributed as dist

        dist.broadcast(tensor.data, src=self.ranks[root], group=self.process_group)


# ------------------------------------------------------------------------------------ factory
@dataclass(frozen=True)
class CommGroups:
    """The Topology's groups through one backend: `replicas` (every rank of this rank's pipeline
    stage: dense gradients and initial parameters; the world when pp = 1), EP and EDP."""

    backend: str
    replicas: Group
    ep: Group
    edp: Group
    note: str = ""  # how device tensors travel

    def describe(self) -> str:
        """One line for the start-up table: which backend carries tensors over which group sizes."""
        return (f"comm: backend {self.backend}: stage replicas {self.replicas.size} rank(s), EP group {self.ep.size}, "
                f"EDP group {self.edp.size}{self.note}; host control over MPI")


TORCH_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "xpu": "xccl"}  # torch.distributed per device type (RCCL is
                                                                  # NCCL under ROCm; XCCL is oneCCL)


def build_groups(backend: str, topo: Any, device: torch.device = torch.device("cpu")) -> CommGroups:
    """The Topology's groups through `backend` for tensors on `device`; collective over the world
    (every rank creates every group in the same order). Called once per run, by the entry point,
    right after the Topology and the device choice."""
    from mpi4py import MPI

    if backend not in BACKENDS:
        raise ValueError(f"comm.backend = {backend!r}: must be one of {', '.join(BACKENDS)}")
    layout, rank = topo.layout, topo.rank
    world_ranks = tuple(range(topo.world_size))
    mine = (layout.stage_group(rank), layout.ep_group(rank), layout.edp_group(rank))
    note = ""
    if backend == "mpi":
        aware = device.type != "cpu" and gpu_aware_mpi(MPI.Get_library_version(), dict(os.environ))
        note = "" if device.type == "cpu" else (f"; {device.type} tensors " +
                                                ("straight to GPU-aware MPI" if aware else "staged through host memory"))
        make: dict[tuple[int, ...], Group] = {mine[0]: MPIGroup(topo.stage_comm, aware),
                                              mine[1]: MPIGroup(topo.ep_comm, aware),
                                              mine[2]: MPIGroup(topo.edp_comm, aware)}
    else:
        every = [g for r in world_ranks for g in (layout.stage_group(r), layout.ep_group(r), layout.edp_group(r))]
        if backend == "horovod":
            make = _horovod_groups(topo.world, world_ranks, every, rank)
        else:
            note = f"; torch.distributed {TORCH_BACKENDS[device.type]}"
            make = _torch_groups(topo.world, world_ranks, every, rank, device)
    replicas, ep, edp = (SoloGroup(backend) if len(g) == 1 else make[g] for g in mine)
    return CommGroups(backend=backend, replicas=replicas, ep=ep, edp=edp, note=note)


def _horovod_groups(world_comm: Any, world_ranks: tuple[int, ...], groups: list[tuple[int, ...]],
                    rank: int) -> dict[tuple[int, ...], Group]:
    import horovod.torch as hvd
    from horovod.common.process_sets import ProcessSet

    distinct = sorted({g for g in groups if 1 < len(g) < len(world_ranks)})
    sets = {g: ProcessSet(list(g)) for g in distinct}
    if not hvd.is_initialized():
        hvd.init(comm=world_comm, process_sets=list(sets.values()))
    make = {g: HorovodGroup(s, g) for g, s in sets.items()}
    make[world_ranks] = HorovodGroup(hvd.global_process_set, world_ranks)
    return make


def _torch_groups(world_comm: Any, world_ranks: tuple[int, ...], groups: list[tuple[int, ...]], rank: int,
                  device: torch.device) -> dict[tuple[int, ...], Group]:
    import torch.distributed as dist

    kind = TORCH_BACKENDS[device.type]

    if not dist.is_initialized():
        # Rendezvous over a TCP store on rank 0, its address and a free port shared through MPI.
        if rank == 0:
            with socket.socket() as s:
                s.bind(("", 0))
                address = (socket.gethostbyname(socket.gethostname()), s.getsockname()[1])
        else:
            address = None
        host, port = world_comm.bcast(address, root=0)  # collective
        dist.init_process_group(kind, init_method=f"tcp://{host}:{port}", rank=rank, world_size=len(world_ranks),
                                device_id=device if device.type != "cpu" else None)
    make: dict[tuple[int, ...], Group] = {world_ranks: TorchGroup(None, world_ranks)}
    for g in sorted({g for g in groups if 1 < len(g) < len(world_ranks)}):
        pg = dist.new_group(list(g), backend=kind)  # every rank creates every group, in the same order
        make[g] = TorchGroup(pg, g)
    return make
