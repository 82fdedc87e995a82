"""Run under `mpiexec -n K`, float64: a composite with nonlinear maps before and after the
differentiable all-to-all (uneven and zero-size splits). Its first derivative, and the derivative
of a loss on that derivative (the double backward of force training), must equal the same
computation done in one process on all ranks' data. Rank 0 writes the comparison as JSON.
(torch.autograd.gradcheck does not apply: it perturbs one rank's input while the others supply
their own gradient vectors to the same collective.)"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from exaforce.comm.alltoall import all_to_all
from exaforce.comm.groups import build_groups
from exaforce.parallel.topology import Topology

D = 3


def split_matrix(world: int) -> np.ndarray:
    """S[i, j] rows from rank i to rank j: circulant of 0..world−1 (every row and column sums alike,
    so gradcheck issues the same number of collectives on every rank; zeros included)."""
    return np.array([[(j - i) % world for j in range(world)] for i in range(world)])


def main(out_path: str, backend: str) -> None:
    topo = Topology.from_mpi()
    world, rank, comm = topo.world_size, topo.rank, topo.world  # comm: host-side gathers of the results
    group = build_groups(backend, topo).replicas  # the exchange under test (the world: no pipeline)
    S = split_matrix(world) if world > 1 else np.array([[5]])
    send, recv = S[rank].tolist(), S[:, rank].tolist()
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(sum(send), D, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(sum(recv), D, dtype=torch.float64, generator=gen)

    # Serial reference: every rank's rows gathered on every rank, exchanged by index arithmetic.
    def composite(xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """What each rank receives, computed in one process from all ranks' inputs."""
        pieces = [list(torch.sin(xi).mul(1.3).split(S[i].tolist())) for i, xi in enumerate(xs)]
        return [torch.cat([pieces[i][j] for i in range(world)]) for j in range(world)]

    # Distributed: second derivative of a scalar through the exchange (as force training does).
    y = torch.tanh(all_to_all(torch.sin(x) * 1.3, send, recv, group))
    g = torch.autograd.grad((y * w).sum(), x, create_graph=True)[0]
    gg = torch.autograd.grad(g.pow(2).sum(), x)[0]
    # gradcheck / gradgradcheck style, collectively: every rank moves its input along its own
    # direction v at once, and central differences of global scalars (sums over ranks) must match
    # the directional derivatives Σ_ranks g·v (first) and Σ_ranks gg·v (second, through the double backward).
    v = torch.randn(x.shape, dtype=torch.float64, generator=gen)
    eps = 1e-6

    def global_f(x_in: torch.Tensor) -> float:
        return comm.allreduce(float((torch.tanh(all_to_all(torch.sin(x_in) * 1.3, send, recv, group)) * w).sum()))

    def global_h(x_in: torch.Tensor) -> float:
        x_in = x_in.detach().requires_grad_(True)
        y_in = torch.tanh(all_to_all(torch.sin(x_in) * 1.3, send, recv, group))
        return comm.allreduce(float(torch.autograd.grad((y_in * w).sum(), x_in)[0].pow(2).sum()))

    with torch.no_grad():
        fd_first = (global_f(x + eps * v) - global_f(x - eps * v)) / (2 * eps)
    fd_second = (global_h(x + eps * v) - global_h(x - eps * v)) / (2 * eps)
    an_first = comm.allreduce(float((g.detach() * v).sum()))
    an_second = comm.allreduce(float((gg * v).sum()))

    all_x = [torch.tensor(a) for a in comm.allgather(x.detach().numpy())]
    all_w = [torch.tensor(a) for a in comm.allgather(w.numpy())]
    all_g = comm.gather(g.detach().numpy(), root=0)
    all_gg = comm.gather(gg.numpy(), root=0)
    if rank == 0:
        xs = [xi.clone().requires_grad_(True) for xi in all_x]
        ys = [torch.tanh(r) for r in composite(xs)]
        gs = torch.autograd.grad(sum((yi * wi).sum() for yi, wi in zip(ys, all_w)), xs, create_graph=True)
        ggs = torch.autograd.grad(sum(gi.pow(2).sum() for gi in gs), xs)

        def max_abs(arrays) -> float:
            return max(float(np.abs(a).max(initial=0.0)) for a in arrays)

        with open(out_path, "w") as f:
            json.dump({"world": world, "rows_sent": S.sum(axis=1).tolist(),
                       "first_max_abs_diff": max_abs(a - b.detach().numpy() for a, b in zip(all_g, gs)),
                       "first_scale": max_abs(b.detach().numpy() for b in gs),
                       "second_max_abs_diff": max_abs(a - b.numpy() for a, b in zip(all_gg, ggs)),
                       "second_scale": max_abs(b.numpy() for b in ggs),
                       "fd_first": fd_first, "analytic_first": an_first,
                       "fd_second": fd_second, "analytic_second": an_second}, f)
    comm.Barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "mpi")
