"""Downpour's shards: serve the replicas' pushes and fetches, and the coordinator's
snapshot requests, until it says FINISH."""

from __future__ import annotations

import time

import numpy as np

from ... import tags
from ...mpiwait import recv
from ...optim import make_optimizer
from ...server import ShardServer

__all__ = ["DIVERGED_AFTER", "direct_pushes", "make_shard", "serve_shard", "request_snapshots"]

# A shard that rejects this many pushes in a row (NaN/Inf) reports the run as diverging.
DIVERGED_AFTER = 20


def direct_pushes(cfg) -> bool:
    """Plain SGD: replicas apply their pushes to the shards themselves (dbmpi.server), unless
    ``optimizer.direct_push`` is false."""
    return not cfg.optimizer.adagrad and cfg.optimizer.direct_push


def make_shard(topo, cfg, net, ps, resume=None):
    """Shard ``topo.index``'s server, its window memory initialised (call before the start
    barrier, so no client reads or writes it first)."""
    s, layout = topo.index, ps.layout
    lo, hi = ps.ranges[s]
    opt = make_optimizer(cfg.optimizer, hi - lo)
    init = layout.init_range(net, cfg.optimizer.seed, lo, hi)    # my range alone
    server = ShardServer(ps.pw[s], ps.iw[s], topo.shard_ranks[s], lo, hi, ps.slot_ranges[s],
                         opt, init, bell=ps.bell if ps.rung[s] else None,
                         landing=ps.landing, outbox=ps.outbox, direct=direct_pushes(cfg))
    if resume is not None:
        server.restore(layout.take(resume["params"], lo, hi),
                       {k: layout.take(v, lo, hi) for k, v in resume["state"].items()},
                       int(resume["counters"].get(f"shard{s}_version", 0)))
    return server


def serve_shard(topo, server):
    """Apply pushes and answer the coordinator until it says FINISH."""
    from mpi4py import MPI
    s = topo.index
    ctrl, backoff, st = topo.ctrl, server.backoff(), MPI.Status()
    cpu0, idle_s = time.process_time(), 0.0
    seen, warned = (0, 0), False
    while True:
        applied = server.serve()
        if applied and not warned:
            if server.applied != seen[0]:
                seen = (server.applied, server.rejected)      # a good push resets the run
            elif server.rejected - seen[1] >= DIVERGED_AFTER:
                ctrl.send(server.rejected, dest=0, tag=tags.DIVERGED)
                warned = True
        if ctrl.Iprobe(source=0, status=st):
            tag = st.Get_tag()
            ctrl.recv(source=0, tag=tag)
            if tag == tags.FINISH:
                break
            if tag == tags.DRAIN:
                while server.poll():
                    pass
            params, state, version = server.snapshot()
            # the vectors go as raw buffers after the message that names them: no pickled
            # copy of a shard's slice (see request_snapshots)
            vectors = [("params", params)] + sorted(state.items())
            ctrl.send({"shard": s, "vectors": [(k, len(v), v.dtype.str) for k, v in vectors],
                       "version": version,
                       "applied": server.applied, "rejected": server.rejected,
                       "staleness": server.staleness.tolist(),
                       "cpu_s": time.process_time() - cpu0, "idle_s": idle_s,
                       "attended_s": server.attended_s},
                      dest=0, tag=tags.SNAP)
            for _, v in vectors:
                ctrl.Send(v, dest=0, tag=tags.SNAP_DATA)
            del params, state, vectors
        else:
            t = time.perf_counter()
            server.pause(applied, backoff)
            idle_s += time.perf_counter() - t


def request_snapshots(topo, tag=tags.SNAP_REQ):
    """From the coordinator: every shard's snapshot (``DRAIN``: after applying every push
    it holds), in shard order, each a dict with ``params`` and ``state`` (see
    serve_shard)."""
    from mpi4py import MPI
    ctrl = topo.ctrl
    for rank in topo.shard_ranks:
        ctrl.send(None, dest=rank, tag=tag)
    snaps = [None] * topo.shards
    for _ in topo.shard_ranks:
        m = recv(ctrl, MPI.ANY_SOURCE, tags.SNAP)
        rank, m["state"] = topo.shard_ranks[m["shard"]], {}
        for name, n, dtype in m.pop("vectors"):    # sent right after, in this order
            v = np.empty(n, dtype=dtype)
            ctrl.Recv(v, source=rank, tag=tags.SNAP_DATA)
            if name == "params":
                m["params"] = v
            else:
                m["state"][name] = v
        snaps[m["shard"]] = m
    return snaps
