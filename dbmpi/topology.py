"""Roles and communicators: COMM_WORLD is split once, here, and handed to each role.

World ranks: 0 is the coordinator, 1..S the parameter-server shards, then the replicas'
partitions, replica-major: replica r, partition p is rank ``1 + S + r*P + p``.  Algorithms
without a parameter server (``sgd``, ``sync``) have only replica ranks, from 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from .algorithms import ALGORITHMS

__all__ = ["Topology", "shard_ranges", "role_of", "shards_of"]


def shards_of(cfg: dict) -> int:
    """The number of parameter-server shards: ``cluster.ps_shards`` where the algorithm has
    a parameter server (the registry, dbmpi.algorithms), else 0."""
    if ALGORITHMS[cfg.optimizer.algorithm].parameter_server:
        return cfg.cluster.ps_shards
    return 0


def role_of(rank: int, cfg: dict) -> tuple[str, int, int]:
    """(role, index, partition) of world rank ``rank`` under ``cfg``; needs no MPI."""
    S = shards_of(cfg)
    if S and rank == 0:
        return "coordinator", 0, 0
    if S and rank <= S:
        return "shard", rank - 1, 0
    index, part = divmod(rank - (1 + S if S else 0), cfg.cluster.partitions)
    return "replica", index, part


def describe(role: str, index: int, partition: int) -> str:
    if role == "replica":
        return f"replica {index}, partition {partition}"
    if role == "shard":
        return f"parameter-server shard {index}"
    return "coordinator"


def shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous, balanced ranges of a length-n vector over ``shards`` shards."""
    return [(n * s // shards, n * (s + 1) // shards) for s in range(shards)]


@dataclass
class Topology:
    """This rank's role and the communicators it needs.

    Attributes
    ----------
    role : {"coordinator", "shard", "replica"}
    index : shard index or replica index (0 for the coordinator)
    partition : partition index inside the replica (replicas only)
    ctrl : duplicate of the world communicator for dbmpi's control messages
    rma : duplicate of the world communicator over which the RMA windows are created
    model : the replica's model-partition communicator (None elsewhere)
    peers : the ranks holding the same partition of every replica, for ``sync``'s Allreduce
    """
    role: str
    index: int
    partition: int
    shards: int
    replicas: int
    partitions: int
    ctrl: object
    rma: object
    model: object
    peers: object
    shard_ranks: list
    replica_ranks: list  # replica_ranks[r][p] = world rank

    @classmethod
    def split(cls, world, cfg: dict) -> "Topology":
        """Collective over ``world``: split it by role."""
        c = cfg.cluster
        R, P = c.replicas, c.partitions
        S = shards_of(cfg)
        first = 1 + S if S else 0
        rank = world.Get_rank()
        role, index, part = role_of(rank, cfg)
        ctrl, rma = world.Dup(), world.Dup()
        color = {"coordinator": 0, "shard": 1, "replica": 2 + index}[role]
        group = world.Split(color, rank)
        model = group if role == "replica" else None
        if model is None:
            group.Free()
        same = world.Split(part if role == "replica" else P + 1, rank)
        peers = same if role == "replica" else None
        if peers is None:
            same.Free()
        return cls(role, index, part, S, R, P, ctrl, rma, model, peers,
                   list(range(1, 1 + S)),
                   [[first + r * P + p for p in range(P)] for r in range(R)])

    def describe(self) -> str:
        return describe(self.role, self.index, self.partition)
