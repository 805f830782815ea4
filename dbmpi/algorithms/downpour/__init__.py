"""Downpour SGD: asynchronous replicas, a sharded parameter server, a coordinator.

What a replica may see: its fetch of shard s is one consistent version of that shard
(never half an update), but different shards may be at different versions, and by the time
its gradient arrives the shard may have applied other replicas' pushes (the staleness that
summary.json reports).  What a push guarantees: a push a shard took is applied there exactly
once, as one update (or rejected whole if it holds NaN/Inf); a push a shard had no room for
stays in the replica's accumulator and goes with its next push.
"""

from __future__ import annotations

from ... import tags
from ...model.layout import Layout
from ...server import PSSetup
from ..common import coordinate
from .coordinator import Coordinator
from .replica import Replica
from .shard import direct_pushes, make_shard, request_snapshots, serve_shard

__all__ = ["run_downpour", "direct_pushes", "make_shard", "serve_shard", "request_snapshots"]


def run_downpour(topo, cfg, net, out, resume=None, quiet=False):
    """Every rank calls this; each plays its role.  Returns the summary on the coordinator."""
    lr = cfg.optimizer.learning_rate if direct_pushes(cfg) else None
    ps = PSSetup(topo, Layout(net, topo.partitions), lr, cfg.cluster.ps_progress)
    server = make_shard(topo, cfg, net, ps, resume) if topo.role == "shard" else None
    ps.start(topo)                 # every shard's memory is initialised before anyone uses it
    if server is not None:
        serve_shard(topo, server)
    summary = None
    if topo.role == "replica":
        Replica(topo, cfg, ps.client, resume).run()
    elif topo.role == "coordinator":
        summary = coordinate(out, cfg, resume, lambda run: Coordinator(
            topo, cfg, net, ps, run, quiet, resume).train())
        for rank in topo.shard_ranks + [x for reps in topo.replica_ranks for x in reps]:
            topo.ctrl.send(None, dest=rank, tag=tags.FINISH)
    ps.free()
    return summary
