"""The rank/communicator topology. One `Topology` owns every MPI communicator of a run.

The world is a grid dp × pp × gp × ep. EP groups are consecutive ranks (so an EP group sits inside
a node when ep <= ranks_per_node); the ranks of a graph-parallel (GP) group, which split the same
structures' atoms, are ep apart; pipeline neighbours gp · ep apart; expert-data-parallel (EDP)
groups and stage groups (the replicas of one stage) are strided. The layout is a pure function of the sizes (`grid_layout`), tested without MPI;
communicators are built from it once.

Host-side control (counts, loss sums, flags, barriers) goes through the Topology's named
collectives below, so a reader finds every exchange outside exaforce.parallel and exaforce.comm by
its name (`topo.sum`, `topo.allgather`, ...). Tensors move through the backend groups
(exaforce.comm.groups), built once per run by `exaforce.parallel.build_groups`.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

import numpy as np


class TopologyError(ValueError):
    """A layout that does not fit the world; raised before any work starts."""


@dataclass(frozen=True, slots=True)
class GridLayout:
    """Which ranks form which group in a dp × pp × gp × ep grid (no communicators).

    rank = ((dp_index · pp + pp_index) · gp + gp_index) · ep + ep_index: EP groups are consecutive
    ranks (they talk most: an all-to-all per MoE layer), GP peers (a force and energy sum per
    micro-batch) ep apart, pipeline neighbours gp · ep apart, data-parallel replicas outermost."""

    world_size: int
    dp: int
    pp: int = 1
    ep: int = 1
    gp: int = 1

    def dp_index(self, rank: int) -> int:
        return rank // (self.pp * self.gp * self.ep)

    def pp_index(self, rank: int) -> int:
        """The pipeline stage this rank runs (0 = embeddings and the first blocks)."""
        return rank // (self.gp * self.ep) % self.pp

    def gp_index(self, rank: int) -> int:
        """This rank's place in its GP group (which atoms of the group's structures it owns)."""
        return rank // self.ep % self.gp

    def ep_index(self, rank: int) -> int:
        return rank % self.ep

    def ep_group(self, rank: int) -> tuple[int, ...]:
        """Consecutive ranks that together hold one copy of every expert of their stage."""
        start = (rank // self.ep) * self.ep
        return tuple(range(start, start + self.ep))

    def edp_group(self, rank: int) -> tuple[int, ...]:
        """Ranks holding the same experts (same stage and EP coordinate; every GP and dp index)."""
        return tuple(r for r in range(self.world_size)
                     if self.pp_index(r) == self.pp_index(rank) and self.ep_index(r) == self.ep_index(rank))

    def edp_color(self, rank: int) -> int:
        """One number per EDP group (its communicator's split colour)."""
        return self.pp_index(rank) * self.ep + self.ep_index(rank)

    def pp_group(self, rank: int) -> tuple[int, ...]:
        """The stages of this rank's pipeline, in stage order (gp · ep apart)."""
        stride = self.gp * self.ep
        start = self.dp_index(rank) * self.pp * stride + self.gp_index(rank) * self.ep + self.ep_index(rank)
        return tuple(range(start, start + self.pp * stride, stride))

    def gp_group(self, rank: int) -> tuple[int, ...]:
        """The ranks that split this rank's structures between them, in GP order (ep apart)."""
        start = (self.dp_index(rank) * self.pp + self.pp_index(rank)) * self.gp * self.ep + self.ep_index(rank)
        return tuple(range(start, start + self.gp * self.ep, self.ep))

    def stage_group(self, rank: int) -> tuple[int, ...]:
        """Every rank that runs this rank's stage: the ranks its dense gradients are summed over
        (the whole world when pp = 1; GP peers add their shares of one replica's gradient)."""
        return tuple(r for r in range(self.world_size) if self.pp_index(r) == self.pp_index(rank))

    @property
    def replicas(self) -> int:
        """How many shares the global batch is dealt into: dp · ep (every stage of a pipeline and
        every rank of a GP group takes the same share)."""
        return self.dp * self.ep

    def replica_index(self, rank: int) -> int:
        """Which share of the global batch this rank's pipeline takes."""
        return self.dp_index(rank) * self.ep + self.ep_index(rank)


def grid_layout(world_size: int, dp: int, ep: int, pp: int = 1, gp: int = 1) -> GridLayout:
    """Validates a dp × pp × gp × ep grid; dp = 0 means 'whatever is left': world_size / (pp · gp · ep).
    (What the model allows — pp ≤ model.blocks, ep dividing the experts — config.validate checks.)"""
    if world_size < 1:
        raise TopologyError(f"world size {world_size}: must be >= 1")
    if ep < 1 or pp < 1 or gp < 1 or dp < 0:
        raise TopologyError(f"parallel.dp = {dp}, parallel.pp = {pp}, parallel.gp = {gp}, parallel.ep = {ep}: "
                            "need dp >= 0, pp >= 1, gp >= 1 and ep >= 1")
    inner, names = pp * gp * ep, "parallel.pp × parallel.gp × parallel.ep"
    if dp == 0:
        if world_size % inner:
            raise TopologyError(f"{names} = {pp} × {gp} × {ep} = {inner} does not divide the world size {world_size}")
        dp = world_size // inner
    if dp * inner != world_size:
        raise TopologyError(f"parallel.dp × {names[9:]} = {dp} × {pp} × {gp} × {ep} = {dp * inner} "
                            f"but the job has {world_size} ranks")
    return GridLayout(world_size=world_size, dp=dp, ep=ep, pp=pp, gp=gp)


class Topology:
    """World, node, node-leader, EP, EDP, pipeline, stage and GP communicators, built once from a GridLayout."""

    def __init__(self, world: Any, dp: int = 0, ep: int = 1, pp: int = 1, gp: int = 1):
        from mpi4py import MPI

        self.world = world
        self.rank: int = world.Get_rank()
        self.world_size: int = world.Get_size()
        self.layout = grid_layout(self.world_size, dp, ep, pp, gp)
        self.node = world.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank: int = self.node.Get_rank()
        self.ranks_per_node: int = self.node.Get_size()
        # Node leaders (local rank 0) form `leaders`; everybody else gets COMM_NULL.
        self.leaders = world.Split(0 if self.local_rank == 0 else MPI.UNDEFINED, self.rank)
        self.n_nodes: int = world.allreduce(1 if self.local_rank == 0 else 0)
        self.hostname = socket.gethostname()
        layout = self.layout
        self.ep_comm = world.Split(self.rank // layout.ep, self.rank)
        self.edp_comm = world.Split(layout.edp_color(self.rank), self.rank)
        self.pp_comm = world.Split(layout.pp_group(self.rank)[0], self.rank)  # stage s is pp_comm rank s
        self.stage_comm = world.Split(layout.pp_index(self.rank), self.rank)
        self.gp_comm = world.Split(layout.gp_group(self.rank)[0], self.rank)  # GP index i is gp_comm rank i
        self.stage: int = layout.pp_index(self.rank)
        self.gp_index: int = layout.gp_index(self.rank)

    @classmethod
    def from_mpi(cls, dp: int = 0, ep: int = 1, pp: int = 1, gp: int = 1) -> "Topology":
        """The job's topology over MPI.COMM_WORLD (the only place COMM_WORLD is touched)."""
        from mpi4py import MPI

        return cls(MPI.COMM_WORLD, dp=dp, ep=ep, pp=pp, gp=gp)

    @classmethod
    def one_graph_group(cls) -> "Topology":
        """Every rank of the job in one GP group (the ASE calculator under mpiexec: one structure at a time)."""
        from mpi4py import MPI

        return cls(MPI.COMM_WORLD, dp=1, gp=MPI.COMM_WORLD.Get_size())

    @classmethod
    def single_process(cls) -> "Topology":
        """A world of this process alone (MPI.COMM_SELF): benchmarks and serial references run the
        production code paths on it."""
        from mpi4py import MPI

        return cls(MPI.COMM_SELF)

    # -------------------------------------------------- host-side collectives (every rank calls each)
    def sum(self, value: Any) -> Any:
        """Σ over the world of a number or NumPy array (collective)."""
        return self.world.allreduce(value)

    def max(self, value: Any) -> Any:
        """Maximum over the world (collective)."""
        from mpi4py import MPI

        return self.world.allreduce(value, op=MPI.MAX)

    def ep_sum(self, value: Any) -> Any:
        """Σ over this rank's EP group (collective over the group)."""
        return self.ep_comm.allreduce(value)

    def pp_sum(self, value: Any) -> Any:
        """Σ over this rank's pipeline (collective over its stages)."""
        return self.pp_comm.allreduce(value)

    def stage_sum(self, value: Any) -> Any:
        """Σ over the ranks that run this rank's stage (collective over them; the world when pp = 1)."""
        return self.stage_comm.allreduce(value)

    def gp_sum_(self, array: np.ndarray) -> np.ndarray:
        """Σ over this rank's GP group of a float64 array, in place (collective over the group; one
        Allreduce, no pickling: the forces of a large structure)."""
        from mpi4py import MPI

        self.gp_comm.Allreduce(MPI.IN_PLACE, array, op=MPI.SUM)
        return array

    def allgather(self, value: Any) -> list[Any]:
        """Every rank's value, in rank order, on every rank (collective)."""
        return self.world.allgather(value)

    def gather_to_root(self, value: Any) -> list[Any] | None:
        """Every rank's value on world rank 0, None elsewhere (collective)."""
        return self.world.gather(value, root=0)

    def from_root(self, value: Any) -> Any:
        """World rank 0's value on every rank (collective)."""
        return self.world.bcast(value, root=0)

    def barrier(self) -> None:
        self.world.Barrier()  # collective

    def gather_rows_to_root(self, local: np.ndarray, rows_W: list[int], trailing: tuple[int, ...]) -> np.ndarray | None:
        """Rank-ordered concatenation of every rank's float64 rows on rank 0, None elsewhere
        (collective, one Gatherv: no pickling of large arrays)."""
        from mpi4py import MPI

        width = int(np.prod(trailing, dtype=np.int64))
        send = np.ascontiguousarray(local, dtype=np.float64).reshape(-1)
        if not self.is_root:
            self.world.Gatherv(send, None, root=0)
            return None
        counts = np.asarray(rows_W, dtype=np.int64) * width
        out = np.empty((sum(rows_W), *trailing), dtype=np.float64)
        self.world.Gatherv(send, [out.reshape(-1), counts, np.r_[0, np.cumsum(counts)[:-1]], MPI.DOUBLE], root=0)
        return out

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, int]:
        return {"world_size": self.world_size, "dp": self.layout.dp, "pp": self.layout.pp, "gp": self.layout.gp,
                "ep": self.layout.ep, "nodes": self.n_nodes, "ranks_per_node": self.ranks_per_node}

    def table(self, device: str = "cpu") -> str:
        """The whole rank map with each rank's `device`, gathered to every rank (collective; printed
        by rank 0 at start-up)."""
        rows = self.world.allgather((self.rank, self.hostname, self.local_rank, device))
        layout = self.layout
        lines = [f"topology: world={self.world_size} nodes={self.n_nodes} dp={layout.dp} pp={layout.pp} "
                 f"gp={layout.gp} ep={layout.ep}",
                 f"{'rank':>5} {'host':<20} {'local':>5} {'dp':>3} {'pp':>3} {'gp':>3} {'ep':>3}  ep_group  edp_group"
                 + ("  pp_group" if layout.pp > 1 else "") + ("  gp_group" if layout.gp > 1 else "") + "  device"]
        for rank, host, local, on in rows:
            pipeline = f"  {list(layout.pp_group(rank))}" if layout.pp > 1 else ""
            graph = f"  {list(layout.gp_group(rank))}" if layout.gp > 1 else ""
            lines.append(f"{rank:>5} {host[:20]:<20} {local:>5} {layout.dp_index(rank):>3} {layout.pp_index(rank):>3} "
                         f"{layout.gp_index(rank):>3} {layout.ep_index(rank):>3}  {list(layout.ep_group(rank))}  "
                         f"{list(layout.edp_group(rank))}{pipeline}{graph}  {on}")
        return "\n".join(lines)
