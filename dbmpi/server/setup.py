"""What every rank of a parameter-server algorithm builds at start-up, collectively."""

from __future__ import annotations

from .client import PSClient
from .rma import Window, inbox_slots, overlaps, probe_progress
from .shard import PULL_MAX_BYTES

__all__ = ["PSSetup"]


class PSSetup:
    """The shards' ranges and windows, for a vector in ``layout`` (the replicas' partitioned
    layout, dbmpi.model.partition.Layout), which client-shard pairs are
    attended, and, off the shards, this rank's client (a replica partition's slice and
    inbox slots; the whole vector for the coordinator).

    Collective over ``topo.rma``.  ``direct_lr``: plain SGD, whose passive pushes the
    clients apply themselves (then only attended clients get inbox slots).  ``progress``:
    ``auto`` (probe each pair), ``passive`` or ``attended`` (see
    :func:`~dbmpi.server.rma.probe_progress`).  ``pull_max_bytes``: attended push parts up
    to this size are taken by the shard (see :mod:`dbmpi.server.shard`).
    """

    def __init__(self, topo, layout, direct_lr: float | None = None, progress: str = "auto",
                 pull_max_bytes: int = PULL_MAX_BYTES):
        from ..topology import shard_ranges
        self.layout = layout     # the shards hold the vector in it (partition-major)
        n = layout.num_params
        self.ranges = shard_ranges(n, topo.shards)
        comm = topo.rma
        attended = probe_progress(comm, topo.shard_ranks, progress)
        n_att = sum(len(a) for a in attended)
        # per shard: whether any client attends it (a shard nobody rings never looks)
        self.rung = [any(s in a for a in attended) for s in range(topo.shards)]
        # every (non-shard rank, shard) pair, by the way it is reached (summary.json)
        self.pairs = {"passive": (comm.Get_size() - topo.shards) * topo.shards - n_att,
                      "attended": n_att}
        # client replica x P + partition pushes its partition's slice through shard s's
        # inbox, unless it applies its pushes there itself (passive, plain SGD): (0, 0)
        P = topo.partitions
        clients = [rank for reps in topo.replica_ranks for rank in reps]   # replica-major
        self.slot_ranges = [
            [self.layout.ranges[c % P] if direct_lr is None or s in attended[rank] else (0, 0)
             for c, rank in enumerate(clients)]
            for s in range(topo.shards)]
        my_shard = topo.index if topo.role == "shard" else None
        self.pw, self.iw = [], []
        for s, (lo, hi) in enumerate(self.ranges):
            mine = s == my_shard
            self.pw.append(Window(comm, 8 * 4 + 4 * (hi - lo) if mine else 0))
            self.iw.append(Window(comm, inbox_slots((lo, hi), self.slot_ranges[s])[1]
                                  if mine else 0))
        self.bell = comm.Dup()
        me = comm.Get_rank()
        # each client's copy of its slice, where attended shards Put its fetches (and the
        # shards of Sandblaster each trial point)
        lo, hi = {"replica": self.layout.ranges[topo.partition] if topo.role == "replica"
                  else (0, 0), "coordinator": (0, n)}.get(topo.role, (0, 0))
        self.landing = Window(comm, 4 * (hi - lo))
        # a replica partition's pushes, where the shards it attends take the small ones from
        pulled = topo.role == "replica" and any(
            s in attended[me] and 4 * n <= pull_max_bytes
            for s, _, _, n in overlaps(self.ranges, lo, hi))
        self.outbox = Window(comm, 4 * (hi - lo) if pulled else 0)
        self.client = None
        if topo.role == "replica":
            self.client = PSClient(self.pw, self.iw, self.ranges, topo.shard_ranks, me,
                                   topo.index * topo.partitions + topo.partition, lo, hi,
                                   slot_ranges=self.slot_ranges, direct_lr=direct_lr,
                                   attended=attended[me], bell=self.bell, landing=self.landing,
                                   outbox=self.outbox, pull_max_bytes=pull_max_bytes)
        elif topo.role == "coordinator":
            self.client = PSClient(self.pw, self.iw, self.ranges, topo.shard_ranks, me, 0,
                                   attended=attended[me], bell=self.bell, landing=self.landing,
                                   outbox=self.outbox, pull_max_bytes=pull_max_bytes)

    def start(self, topo) -> None:
        """Collective: shards have initialised their memory before anyone reads it."""
        topo.rma.Barrier()

    def free(self) -> None:
        """Collective; only on success (after an error the launcher aborts the job, and a
        rank waiting in a collective would hang)."""
        for w in self.pw + self.iw + [self.landing, self.outbox]:
            w.free()
        self.bell.Free()
