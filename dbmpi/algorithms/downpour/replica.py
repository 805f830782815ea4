"""Downpour's replicas: each partition of each replica fetches its slice of the parameters
every ``n_fetch`` steps, computes, and pushes its accumulated gradient (or, with direct
pushes, its update) every ``n_push`` steps, asynchronously of the other replicas."""

from __future__ import annotations

import time

import numpy as np

from ... import aligned, tags
from ...mpiwait import Backoff, recv
from ..common import Batches
from ..loop import agree_by
from .shard import DIVERGED_AFTER

__all__ = ["Replica"]


class Replica:
    """One partition of one replica.  With P > 1 partitions, the partitions step in lockstep
    (their forward and backward passes exchange activations); partition 0 talks to the
    coordinator and carries its decisions to the others, and each partition fetches and
    pushes only its own slice of the parameters."""

    def __init__(self, topo, cfg, client, resume=None):
        from ...model.partition import PartitionedNetwork
        o, r = cfg.optimizer, cfg.run
        self.topo, self.client, self.ctrl = topo, client, topo.ctrl
        self.rep, self.lead = topo.index, topo.partition == 0
        self.max_steps, self.log_every = r.max_steps, r.log_every
        self.n_fetch, self.n_push, self.batch_size = o.n_fetch, o.n_push, o.batch_size
        self.model = PartitionedNetwork(cfg.model, topo.model)
        size = self.model.local_size
        c = resume["counters"] if resume else {}
        rep = self.rep
        self.step0 = self.step = int(c.get(f"replica{rep}_step", 0))
        position = (int(c.get(f"replica{rep}_epoch", 0)), int(c.get(f"replica{rep}_offset", 0)))
        self.batches = Batches(cfg.data.path, o.batch_size, o.seed, rep,
                               topo.replicas, cfg.data.cache_mb, position=position,
                               share=topo.model)   # one cache per node (Split)
        self.theta = client.theta               # fetches land here (MPI memory)
        # one buffer each, every step; the gradient's in my outbox where shards take it
        # from there (attended), so a push of it is not copied
        self.accbuf = aligned.zeros(size)
        self.acc, self.acc_empty = self.accbuf, True
        self.gbuf = client.outbox if client.outbox is not None else aligned.empty(size)
        self.lr = np.float32(o.learning_rate)
        self.direct = client.direct_lr is not None
        self.scratch = None if self.direct else aligned.empty(size)  # inbox mode's update
        # warmstart: replica 0 trains alone for its first steps; a run resumed before it
        # was through (preempted early) goes on with it, or the others would wait forever
        self.warm = min(o.warmstart_steps, self.max_steps)
        if int(c.get("replica0_step", 0)) >= self.warm:
            self.warm = 0
        self.seconds = {"fetch": 0.0, "push": 0.0, "compute": 0.0}
        self.fetches = 0
        self.dropped = self.bad_run = 0     # non-finite pushes dropped; how many in a row
        # partition 0's value (stop or go), on every partition
        self.agree = agree_by(topo.model, lead_only=True) or int

    def run(self) -> None:
        stopped = self.wait_for_warmstart()
        t0 = time.perf_counter()
        if not stopped:
            self.fetch()
        while not stopped and self.step < self.max_steps:
            if self.step and self.step % self.n_fetch == 0:
                self.fetch()
            loss = self.compute()
            if self.step % self.n_push == 0:
                self.push()
            stopped = self.agree(self.lead and self.report(loss))
        self.finish(bool(stopped), time.perf_counter() - t0)

    def wait_for_warmstart(self) -> bool:
        """Replicas other than 0 wait for the coordinator's go (or a stop) without
        spinning; True where it said stop."""
        from mpi4py import MPI
        stopped = 0
        if self.warm and self.rep != 0:
            if self.lead:
                st = MPI.Status()
                recv(self.ctrl, 0, MPI.ANY_TAG, Backoff(hi=0.02), st)
                stopped = int(st.Get_tag() == tags.STOP)
            stopped = self.agree(stopped)
        return bool(stopped)

    def fetch(self) -> None:
        t = time.perf_counter()
        self.client.fetch(self.theta)
        self.seconds["fetch"] += time.perf_counter() - t
        self.fetches += 1

    def compute(self) -> float:
        """One step: the gradient (direct pushes: the update itself, -lr x gradient, scaled
        in the backward pass) into the accumulator, and the local copy's own update."""
        x, y = self.batches.next()
        t = time.perf_counter()
        loss, g = self.model.loss_and_grad(self.theta, x, y, out=self.gbuf,
                                           scale=-self.lr if self.direct else 1.0)
        if self.acc_empty:
            if self.n_push == 1:           # pushed this step, before gbuf is written again
                self.acc = g
            else:
                self.acc = self.accbuf
                np.copyto(self.acc, g)
            self.acc_empty = False
        else:
            self.acc += g
        self.step += 1
        if self.step % self.n_fetch and self.step < self.max_steps:
            # the replica's own update of its local copy (pointless when it fetches next)
            if self.direct:
                self.theta += g
            else:
                np.multiply(g, self.lr, out=self.scratch)
                self.theta -= self.scratch
        self.seconds["compute"] += time.perf_counter() - t
        return loss

    def push(self) -> None:
        t = time.perf_counter()
        before = self.client.rejected
        self.acc_empty = self.client.push(self.acc, update=self.direct)
        if self.client.rejected == before:
            self.bad_run = 0
        else:   # it held NaN/Inf: the client dropped it whole, at every shard
            self.dropped, self.bad_run = self.dropped + 1, self.bad_run + 1
            if self.bad_run == DIVERGED_AFTER:
                self.ctrl.send(self.dropped, dest=0, tag=tags.DIVERGED)
        self.seconds["push"] += time.perf_counter() - t

    def report(self, loss) -> bool:
        """The lead's messages to the coordinator after a step; True where it said stop."""
        step, ctrl = self.step, self.ctrl
        if step % self.log_every == 0 or step == 1:
            ctrl.send({"replica": self.rep, "step": step, "loss": float(loss),
                       "epoch": self.batches.epoch, "offset": self.batches.offset}, dest=0,
                      tag=tags.LOG)
        if self.warm and self.rep == 0 and step == self.warm:
            # warm (or all its steps done, when they are fewer): the others may start
            ctrl.send(step, dest=0, tag=tags.WARM)
        if ctrl.Iprobe(source=0, tag=tags.STOP):
            ctrl.recv(source=0, tag=tags.STOP)
            return True
        return False

    def finish(self, stopped: bool, wall: float) -> None:
        """The last push, this replica's figures to the coordinator, then wait for the
        end of the run."""
        client, model, topo = self.client, self.model, self.topo
        if not self.acc_empty and np.any(self.acc):
            # offer what is left once; what no shard had room for is dropped
            client.push(self.acc, update=self.direct)
        client.wait_applied()       # before the coordinator drains the shards
        mine = {"pushes_sent": client.pushes_sent, "push_attempts": client.push_attempts,
                "nonfinite_dropped": self.dropped, "pushes_rejected": client.rejected,
                "staleness": client.staleness}
        allp = topo.model.gather(mine, root=0)          # every partition's, on partition 0
        if self.lead:
            mine = {k: sum(d[k] for d in allp) for k in mine}
        bytes_sent = topo.model.gather(model.bytes_sent, root=0)
        exch_s = topo.model.gather(model.exchange_seconds, root=0)
        mine["staleness"] = mine["staleness"].tolist()
        steps = max(self.step - self.step0, 1)
        if self.lead:
            self.ctrl.send({
                "replica": self.rep, "steps": self.step,
                "samples": (self.step - self.step0) * self.batch_size,
                "epoch": self.batches.epoch, "offset": self.batches.offset, "wall_s": wall,
                "compute_s": self.seconds["compute"], "fetch_s": self.seconds["fetch"],
                "push_s": self.seconds["push"], "fetches": self.fetches,
                "stopped_early": stopped,
                "partition_bytes_per_step": [b / steps for b in bytes_sent],
                "partition_exchange_ms_per_step": [1e3 * e / steps for e in exch_s],
                **mine}, dest=0, tag=tags.DONE)
        if not (self.lead and stopped):  # the coordinator sends STOP to every rank; take it
            recv(self.ctrl, 0, tags.STOP, Backoff(hi=0.02))
        recv(self.ctrl, 0, tags.FINISH, Backoff(hi=0.02))
