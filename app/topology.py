"""The rank/communicator topology. One `Topology` owns every communicator of a run.

The world is a grid dp × ep. EP groups are consecutive ranks (so an EP group sits inside a node
when ep <= ranks_per_node); expert-data-parallel (EDP) groups are strided. The layout is a pure
function of the sizes (`grid_layout`), tested without MPI; communicators are built from it once.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from exaforce.comm.groups import CommGroups


class TopologyError(ValueError):
    """A layout that does not fit the world; raised before any work starts."""


@dataclass(frozen=True, slots=True)
class GridLayout:
    """Which ranks form which group in a dp × ep grid (no communicators)."""

    world_size: int
    dp: int
    ep: int

    def ep_group(self, rank: int) -> tuple[int, ...]:
        """Consecutive ranks that together hold one copy of every expert."""
        start = (rank // self.ep) * self.ep
        return tuple(range(start, start + self.ep))

    def edp_group(self, rank: int) -> tuple[int, ...]:
        """Ranks holding the same experts (same EP coordinate), strided by ep."""
        return tuple(range(rank % self.ep, self.world_size, self.ep))

    def coords(self, rank: int) -> tuple[int, int]:
        """(dp index, ep index) of a rank."""
        return rank // self.ep, rank % self.ep


def grid_layout(world_size: int, dp: int, ep: int) -> GridLayout:
    """Validates a dp × ep grid; dp = 0 means 'whatever is left': world_size / ep."""
    if world_size < 1:
        raise TopologyError(f"world size {world_size}: must be >= 1")
    if ep < 1 or dp < 0:
        raise TopologyError(f"parallel.dp = {dp}, parallel.ep = {ep}: need dp >= 0 and ep >= 1")
    if dp == 0:
        if world_size % ep:
            raise TopologyError(f"parallel.ep = {ep} does not divide the world size {world_size}")
        dp = world_size // ep
    if dp * ep != world_size:
        raise TopologyError(f"parallel.dp × parallel.ep = {dp} × {ep} = {dp * ep} "
                            f"but the job has {world_size} ranks")
    return GridLayout(world_size=world_size, dp=dp, ep=ep)


class Topology:
    """World, node, node-leader, EP and EDP communicators, built once from a GridLayout."""

    def __init__(self, world: Any, dp: int = 0, ep: int = 1):
        from mpi4py import MPI

        self.world = world
        self.rank: int = world.Get_rank()
        self.world_size: int = world.Get_size()
        self.layout = grid_layout(self.world_size, dp, ep)
        self.node = world.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank: int = self.node.Get_rank()
        self.ranks_per_node: int = self.node.Get_size()
        # Node leaders (local rank 0) form `leaders`; everybody else gets COMM_NULL.
        self.leaders = world.Split(0 if self.local_rank == 0 else MPI.UNDEFINED, self.rank)
        self.n_nodes: int = world.allreduce(1 if self.local_rank == 0 else 0)
        self.hostname = socket.gethostname()
        self.ep_comm = world.Split(self.rank // self.layout.ep, self.rank)
        self.edp_comm = world.Split(self.rank % self.layout.ep, self.rank)
        self._groups: dict[str, Any] = {}

    def groups(self, backend: str) -> "CommGroups":
        """World, EP and EDP groups through a communication backend (mpi | horovod | torch), built
        once per backend (collective the first time) and owned here like every communicator."""
        from exaforce.comm.groups import build_groups

        if backend not in self._groups:
            self._groups[backend] = build_groups(backend, self)
        return self._groups[backend]

    @classmethod
    def from_mpi(cls, dp: int = 0, ep: int = 1) -> "Topology":
        """The job's topology over MPI.COMM_WORLD (the only place COMM_WORLD is touched)."""
        from mpi4py import MPI

        return cls(MPI.COMM_WORLD, dp=dp, ep=ep)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, int]:
        return {"world_size": self.world_size, "dp": self.layout.dp, "ep": self.layout.ep,
                "nodes": self.n_nodes, "ranks_per_node": self.ranks_per_node}

    def table(self) -> str:
        """The whole rank map, gathered to every rank (printed by rank 0 at start-up)."""
        rows = self.world.allgather((self.rank, self.hostname, self.local_rank))
        lines = [f"topology: world={self.world_size} nodes={self.n_nodes} dp={self.layout.dp} ep={self.layout.ep}",
                 f"{'rank':>5} {'host':<20} {'local':>5} {'dp':>3} {'ep':>3}  ep_group  edp_group"]
        for rank, host, local in rows:
            dp_i, ep_i = self.layout.coords(rank)
            lines.append(f"{rank:>5} {host[:20]:<20} {local:>5} {dp_i:>3} {ep_i:>3}  "
                         f"{list(self.layout.ep_group(rank))}  {list(self.layout.edp_group(rank))}")
        return "\n".join(lines)
