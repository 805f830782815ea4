"""Launched by tests under mpiexec: replicas push known integer gradients into the real shard
servers with random delays and check every fetch for torn shards; the coordinator drains
the shards and prints JSON with the final parameters' exactness.

Usage: mpiexec -n (1 + SHARDS + REPLICAS) python tests/mpi_ps_stress.py SHARDS REPLICAS PUSHES N [NAN_EVERY [MODE [PROGRESS [PULL_MAX_BYTES]]]]

With NAN_EVERY > 0, replica 0 also pushes, on its own, a gradient holding a NaN (in one
shard's slice) every NAN_EVERY pushes: each must be rejected whole, at every shard, and
leave the parameters unchanged.  MODE is
``direct`` (replicas Accumulate into the shards themselves) or ``inbox`` (the shards apply);
PROGRESS is ``cluster.ps_progress`` (auto, passive or attended: replicas ring the shards and
push through their inboxes even in direct mode); PULL_MAX_BYTES, the largest attended push
part the shards Get (larger ones the replicas Put).
"""

import json
import sys
import time

import numpy as np
from mpi4py import MPI

from dbmpi import tags
from dbmpi.mpiwait import recv
from dbmpi.algorithms.downpour import (direct_pushes, make_shard,
                                      request_snapshots, serve_shard)
from dbmpi.config import parse
from dbmpi.model.layout import Layout
from dbmpi.server import PSSetup
from dbmpi.server.shard import PULL_MAX_BYTES
from dbmpi.topology import Topology


class ZeroNet:
    """Stands in for a network: only the parameter count and a zero initialisation."""

    def __init__(self, n):
        self.num_params = n

    def init_params(self, seed):
        return np.zeros(self.num_params, dtype=np.float32)

    def init_range(self, seed, lo, hi, out=None):
        out = np.empty(hi - lo, dtype=np.float32) if out is None else out
        out[...] = 0
        return out


def main():
    S, R, pushes, n = map(int, sys.argv[1:5])
    nan_every = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    mode = sys.argv[6] if len(sys.argv) > 6 else "direct"
    progress = sys.argv[7] if len(sys.argv) > 7 else "auto"
    pull_max = int(sys.argv[8]) if len(sys.argv) > 8 else PULL_MAX_BYTES
    cfg = parse({"model": {"input_shape": [1, 1, 1], "layers": [{"type": "softmax", "classes": 2}]},
                 "optimizer": {"algorithm": "downpour", "learning_rate": 1.0,
                               "direct_push": mode == "direct"},
                 "cluster": {"ps_shards": S, "replicas": R, "ps_progress": progress}})
    world = MPI.COMM_WORLD
    topo = Topology.split(world, cfg)
    net = ZeroNet(n)
    ps = PSSetup(topo, Layout.whole(n), 1.0 if direct_pushes(cfg) else None, progress, pull_max)
    ranges = ps.ranges
    if topo.role == "shard":
        server = make_shard(topo, cfg, net, ps)
        ps.start(topo)
        serve_shard(topo, server)
    else:
        client = ps.client
        ps.start(topo)
        if topo.role == "replica":
            rng = np.random.default_rng(topo.index)
            acc = np.zeros(n, np.float32)
            empty = True
            theta = np.empty(n, np.float32)
            total, torn, nans = 0, 0, 0
            for i in range(pushes):
                if nan_every and topo.index == 0 and i % nan_every == nan_every - 1:
                    while not empty:               # a NaN push goes alone, never merged
                        empty = client.push(acc)
                    bad = np.full(n, 7.0, np.float32)
                    bad[ranges[-1][0]] = np.nan   # in the last shard's slice only: no
                    # shard may apply its finite part (7 would show in the exact sum)
                    while not client.push(bad):
                        time.sleep(0.001)
                    nans += 1
                c = float(rng.integers(1, 5))
                if empty:
                    acc[:] = 0
                acc += c                       # every element of the push is the same integer
                total += c
                empty = client.push(acc)
                client.fetch(theta)
                for lo, hi in ranges:          # a shard's slice must be one version
                    torn += int(theta[lo:hi].min() != theta[lo:hi].max())
                time.sleep(rng.uniform(0, 0.002))
            while not empty:                   # deliver the rest, retrying while slots are full
                empty = client.push(acc)
                time.sleep(0.001)
            client.wait_applied()
            topo.ctrl.send({"replica": topo.index, "total": total, "torn": torn,
                            "sent": client.pushes_sent, "nans": nans,
                            "rejected": client.rejected}, dest=0, tag=tags.DONE)
            recv(topo.ctrl, 0, tags.FINISH)
        else:
            done = [recv(topo.ctrl, MPI.ANY_SOURCE, tags.DONE) for _ in range(R)]
            snaps = request_snapshots(topo, tags.DRAIN)
            for rank in topo.shard_ranks + [r for reps in topo.replica_ranks for r in reps]:
                topo.ctrl.send(None, dest=rank, tag=tags.FINISH)
            params = np.concatenate([m["params"] for m in snaps])
            expected = -sum(d["total"] for d in done)   # SGD with lr 1: theta = -sum(grads)
            print(json.dumps({
                "expected": expected, "min": float(params.min()), "max": float(params.max()),
                "torn": sum(d["torn"] for d in done),
                "pushes_sent": sum(d["sent"] for d in done),
                "pushes_applied": sum(m["applied"] for m in snaps),
                "pushes_rejected": (sum(m["rejected"] for m in snaps)
                                    + sum(d["rejected"] for d in done)),
                "nan_pushes": sum(d["nans"] for d in done) * S,
                "attended_pairs": ps.pairs["attended"]}))
    ps.free()


if __name__ == "__main__":
    main()
