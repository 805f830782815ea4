"""Sandblaster's replicas: compute the batch gradient on the work portions the coordinator
hands out, and push the sums of the accepted ones to the shards."""

from __future__ import annotations

import time

import numpy as np

from ... import aligned, tags
from ...config import check_model
from ...mpiwait import Backoff, recv, until

__all__ = ["Replica"]


class Replica:
    """One partition of one replica.  Partition 0 receives the coordinator's messages and
    relays them to the other partitions, which all compute each portion together (with
    P > 1 the network is split across them) and each push their own slice."""

    def __init__(self, topo, cfg, client):
        from ...data import open_split
        from ...model.partition import PartitionedNetwork
        o = cfg.optimizer
        spec = dict(check_model(cfg.model), l2=0.0)  # the l2 term is added at the shards
        self.topo, self.client, self.ctrl, self.rep = topo, client, topo.ctrl, topo.index
        self.lead = topo.partition == 0
        self.net = PartitionedNetwork(spec, topo.model)
        self.split = open_split(cfg.data.path, "train", cache_mb=cfg.data.cache_mb,
                                share=topo.model)   # one cache per node (Split)
        self.portion_size, self.push_every = o.portion_size, o.push_every
        faults = cfg.faults
        self.slow = faults.slow_factor if faults.slow_replica == topo.index else 1.0
        self.theta = client.theta               # the shards Put each trial point here
        # the held sums; in my outbox where shards take pushes from there (attended)
        self.acc = (client.outbox if client.outbox is not None
                    else aligned.zeros(self.net.local_size))
        self.acc[:] = 0
        self.batch, self.accepted, self.pushed, self.pending = -1, 0, 0, None
        self.stats = {"portions": 0, "compute_s": 0.0, "push_s": 0.0}
        # the lead's running means of a portion's compute and of a push (its own clock
        # decides for every partition of the replica, so they all push together)
        self.mean = {"portion": 0.0, "push": 0.0}

    def next_message(self):
        """(the coordinator's message, None) on the lead; (message, the lead's decision to
        push first) relayed to the other partitions."""
        backoff = Backoff(lo=5e-5, hi=2e-3)
        if self.lead:
            return recv(self.ctrl, 0, tags.WORK, backoff), None
        return recv(self.topo.model, 0, tags.RELAY, backoff)

    def relay(self, msg, push=None):
        for q in range(1, self.topo.partitions):
            self.topo.model.send((msg, push), dest=q, tag=tags.RELAY)

    def push_first(self, last) -> bool:
        """Push the held sums before this portion?  Before a last-round portion; then every
        ``push_every`` portions, or, with 0, whenever the portion is expected to take
        longer than the push, so the batch never waits on held sums longer than a push."""
        held = self.accepted - self.pushed
        if self.push_every:
            return held > 0 and (last or held >= self.push_every)
        return held > 0 and (last or self.mean["portion"] >= self.mean["push"])

    def running(self, key, dt):
        m = self.mean
        m[key] = dt if m[key] == 0.0 else 0.75 * m[key] + 0.25 * dt

    def push_all(self):
        from ...mpiwait import wait
        if self.accepted == self.pushed:
            return
        t = time.perf_counter()
        client, acc = self.client, self.acc
        until(lambda: client.push(acc), Backoff(lo=5e-5, hi=1e-3))   # my slot may be full
        client.wait_applied()            # before the coordinator collects the sums
        acc[:] = 0
        self.pushed = self.accepted
        wait([self.topo.model.Ibarrier()])   # every partition's slice is at the shards
        self.stats["push_s"] += time.perf_counter() - t
        self.running("push", time.perf_counter() - t)
        if self.lead:   # tell the coordinator at once: it may be waiting only for these sums
            self.ctrl.send(("flushed", self.batch, self.rep, self.pushed), dest=0,
                           tag=tags.WORK)

    def verdict(self, ok):
        """The coordinator's verdict on my last portion: its sums join the held ones."""
        if ok and self.pending is not None:
            self.acc += self.pending
            self.accepted += 1
        self.pending = None

    def run(self) -> None:
        while True:
            msg, push = self.next_message()
            kind = msg[0]
            if self.lead and kind != "work":
                self.relay(msg)
            if kind == "stop":
                self.finish()
                return
            if kind == "batch":      # the shards have Put the trial point into theta
                self.batch, self.accepted, self.pushed, self.pending = msg[1], 0, 0, None
                self.acc[:] = 0
                if self.lead:
                    self.ctrl.send(("ready", self.batch, self.rep, 0), dest=0, tag=tags.WORK)
                continue
            _, b, ok = msg[:3]
            if b != self.batch:
                if self.lead and kind == "work":
                    self.relay(msg, False)
                continue
            self.verdict(ok)
            if kind == "idle":
                self.push_all()
                continue
            p, last = msg[3], msg[4]
            if self.lead:
                push = self.push_first(last)
                self.relay(msg, push)
            if push:
                self.push_all()
            self.compute(p)

    def compute(self, p) -> None:
        """Portion ``p``'s gradient sum, held until the coordinator's verdict."""
        t = time.perf_counter()
        ps = self.portion_size
        idx = np.arange(p * ps, min((p + 1) * ps, len(self.split)))
        x, y = self.split.take(idx)
        loss, g = self.net.loss_and_grad(self.theta, x, y)
        g *= len(idx)                      # sums, not means: portions differ in size
        dt = time.perf_counter() - t
        if self.slow > 1:
            time.sleep((self.slow - 1) * dt)    # [faults] straggler for experiments
        self.stats["compute_s"] += dt
        self.running("portion", time.perf_counter() - t)  # the straggler's sleep included
        self.stats["portions"] += 1
        self.pending = g
        if self.lead:
            self.ctrl.send(("result", self.batch, self.rep, self.pushed, p, loss * len(idx),
                            len(idx)), dest=0, tag=tags.WORK)

    def finish(self) -> None:
        mine = dict(self.stats, replica=self.rep, pushes_sent=self.client.pushes_sent)
        allp = self.topo.model.gather(mine, root=0)
        if self.lead:
            mine["pushes_sent"] = sum(m["pushes_sent"] for m in allp)
            self.ctrl.send(mine, dest=0, tag=tags.REPLY)
