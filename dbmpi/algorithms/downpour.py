"""Downpour SGD: asynchronous replicas, a sharded parameter server, a coordinator.

What a replica may see: its fetch of shard s is one consistent version of that shard
(never half an update), but different shards may be at different versions, and by the time
its gradient arrives the shard may have applied other replicas' pushes (the staleness that
summary.json reports).  What a push guarantees: a push a shard took is applied there exactly
once, as one update (or rejected whole if it holds NaN/Inf); a push a shard had no room for
stays in the replica's accumulator and goes with its next push.
"""

from __future__ import annotations

import time

import numpy as np

from .. import aligned, tags
from ..mpiwait import Backoff, recv, wait
from ..optim import make_optimizer
from ..rundir import RunDir, save_checkpoint
from ..server import PSSetup, ShardServer
from .common import Batches, Evaluator, Progress
from .loop import DIVERGED, DONE, RunLoop

__all__ = ["run_downpour"]

# A shard that rejects this many pushes in a row (NaN/Inf) reports the run as diverging.
DIVERGED_AFTER = 20



# -- shard ---------------------------------------------------------------------------------

def direct_pushes(cfg) -> bool:
    """Plain SGD: replicas apply their pushes to the shards themselves (server.py), unless
    ``optimizer.direct_push`` is false."""
    return not cfg["optimizer"]["adagrad"] and cfg["optimizer"]["direct_push"]


def make_shard(topo, cfg, net, ps, resume=None):
    """Shard ``topo.index``'s server, its window memory initialised (call before the start
    barrier, so no client reads or writes it first)."""
    s, layout = topo.index, ps.layout
    lo, hi = ps.ranges[s]
    opt = make_optimizer(cfg["optimizer"], hi - lo)
    init = layout.init_range(net, cfg["optimizer"]["seed"], lo, hi)    # my range alone
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
            # copy of a shard's slice (see _Coordinator.snapshots)
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


# -- replica -------------------------------------------------------------------------------

def _run_replica(topo, cfg, net, client, resume=None):
    """One partition of one replica.  With P > 1 partitions, the partitions step in lockstep
    (their forward and backward passes exchange activations); partition 0 talks to the
    coordinator and broadcasts its decisions, and each partition fetches and pushes only its
    own slice of the parameters."""
    from mpi4py import MPI
    from ..model.partition import PartitionedNetwork
    o, r = cfg["optimizer"], cfg["run"]
    rep, P = topo.index, topo.partitions
    lead = topo.partition == 0
    model = PartitionedNetwork(cfg["model"], topo.model)
    size = model.local_size
    ctrl = topo.ctrl
    flag = np.zeros(1, dtype=np.int32)

    def agree(value: int) -> int:
        """Partition 0's value, on every partition."""
        if P == 1:
            return value
        flag[0] = value
        wait([topo.model.Ibcast(flag, root=0)])
        return int(flag[0])

    c = resume["counters"] if resume else {}
    step0 = int(c.get(f"replica{rep}_step", 0))
    position = (int(c.get(f"replica{rep}_epoch", 0)), int(c.get(f"replica{rep}_offset", 0)))
    batches = Batches(cfg["data"]["path"], o["batch_size"], o["seed"], rep, topo.replicas,
                      cfg["data"]["cache_mb"], position=position,
                      share=topo.model)   # one cache per node (Split)
    theta = client.theta                    # fetches land here (MPI memory)
    acc, acc_empty = aligned.zeros(size), True
    # one buffer each, every step; the gradient's in my outbox where shards take it from
    # there (attended), so a push of it is not copied
    accbuf = acc
    gbuf = client.outbox if client.outbox is not None else aligned.empty(size)
    lr = np.float32(o["learning_rate"])
    direct = client.direct_lr is not None
    scratch = None if direct else aligned.empty(size)    # the local update's, inbox mode
    # warmstart: replica 0 trains alone for its first steps; a run resumed before it was
    # through (preempted early) goes on with it, or every other replica would wait forever
    warm = min(o["warmstart_steps"], r["max_steps"])
    if int(c.get("replica0_step", 0)) >= warm:
        warm = 0
    stopped = 0
    if warm and rep != 0:
        if lead:   # wait for the coordinator's go (or a stop) without spinning
            st = MPI.Status()
            recv(ctrl, 0, MPI.ANY_TAG, Backoff(hi=0.02), st)
            stopped = int(st.Get_tag() == tags.STOP)
        stopped = agree(stopped)
    t0 = time.perf_counter()
    t_fetch = t_push = t_compute = 0.0
    fetches, step = 0, step0
    dropped = bad_run = 0       # non-finite gradients dropped; how many in a row
    if not stopped:
        t = time.perf_counter()
        client.fetch(theta)
        t_fetch += time.perf_counter() - t
        fetches += 1
    while not stopped and step < r["max_steps"]:
        if step and step % o["n_fetch"] == 0:
            t = time.perf_counter()
            client.fetch(theta)
            t_fetch += time.perf_counter() - t
            fetches += 1
        x, y = batches.next()
        t = time.perf_counter()
        # direct pushes carry the update itself: -lr x gradient, scaled in the backward pass
        loss, g = model.loss_and_grad(theta, x, y, out=gbuf, scale=-lr if direct else 1.0)
        if acc_empty:
            if o["n_push"] == 1:           # pushed this step, before gbuf is written again
                acc = g
            else:
                acc = accbuf
                np.copyto(acc, g)
            acc_empty = False
        else:
            acc += g
        step += 1
        if step % o["n_fetch"] and step < r["max_steps"]:
            # the replica's own update of its local copy (pointless when it fetches next)
            if direct:
                theta += g
            else:
                np.multiply(g, lr, out=scratch)
                theta -= scratch
        t_compute += time.perf_counter() - t
        if step % o["n_push"] == 0:
            t = time.perf_counter()
            before = client.rejected
            acc_empty = client.push(acc, update=direct)
            if client.rejected == before:
                bad_run = 0
            else:   # it held NaN/Inf: the client dropped it whole, at every shard
                dropped, bad_run = dropped + 1, bad_run + 1
                if bad_run == DIVERGED_AFTER:
                    ctrl.send(dropped, dest=0, tag=tags.DIVERGED)
            t_push += time.perf_counter() - t
        if lead and (step % r["log_every"] == 0 or step == 1):
            ctrl.send({"replica": rep, "step": step, "loss": float(loss),
                       "epoch": batches.epoch, "offset": batches.offset}, dest=0,
                      tag=tags.LOG)
        if lead and warm and rep == 0 and step == min(warm, r["max_steps"]):
            # warm (or all its steps done, when they are fewer): the others may start
            ctrl.send(step, dest=0, tag=tags.WARM)
        if lead and ctrl.Iprobe(source=0, tag=tags.STOP):
            ctrl.recv(source=0, tag=tags.STOP)
            stopped = 1
        stopped = agree(stopped)
    if not acc_empty and np.any(acc):
        # offer what is left once; what no shard had room for is dropped
        client.push(acc, update=direct)
    client.wait_applied()       # before the coordinator drains the shards
    wall = time.perf_counter() - t0
    mine = {"pushes_sent": client.pushes_sent, "push_attempts": client.push_attempts,
            "nonfinite_dropped": dropped, "pushes_rejected": client.rejected,
            "staleness": client.staleness}
    if P > 1:
        allp = topo.model.gather(mine, root=0)
        if lead:
            mine = {k: sum(d[k] for d in allp) for k in mine}
        bytes_sent = topo.model.gather(model.bytes_sent, root=0)
        exch_s = topo.model.gather(model.exchange_seconds, root=0)
    else:
        bytes_sent, exch_s = [0], [0.0]
    mine["staleness"] = mine["staleness"].tolist()
    if lead:
        ctrl.send({"replica": rep, "steps": step, "samples": (step - step0) * o["batch_size"],
                   "epoch": batches.epoch, "offset": batches.offset,
                   "wall_s": wall, "compute_s": t_compute, "fetch_s": t_fetch,
                   "push_s": t_push, "fetches": fetches, "stopped_early": bool(stopped),
                   "partition_bytes_per_step": [b / max(step - step0, 1) for b in bytes_sent],
                   "partition_exchange_ms_per_step": [1e3 * e / max(step - step0, 1)
                                                      for e in exch_s],
                   **mine}, dest=0, tag=tags.DONE)
    if not (lead and stopped):  # the coordinator sends STOP to every rank; take it
        recv(ctrl, 0, tags.STOP, Backoff(hi=0.02))
    recv(ctrl, 0, tags.FINISH, Backoff(hi=0.02))


# -- coordinator ---------------------------------------------------------------------------

class _Coordinator:
    def __init__(self, topo, cfg, net, ps, run, quiet, resume):
        self.topo, self.cfg, self.net, self.client = topo, cfg, net, ps.client
        self.layout, self.run = ps.layout, run
        self.pairs = ps.pairs
        self.evaluate = Evaluator(net, cfg["data"]["path"])
        self.say = Progress(enabled=not quiet)
        self.theta = self.client.theta      # fetches land here (MPI memory)
        self.done: dict[int, dict] = {}
        self.last_snaps = None
        c = resume["counters"] if resume else {}
        self.positions = {i: (int(c.get(f"replica{i}_step", 0)), int(c.get(f"replica{i}_epoch", 0)),
                              int(c.get(f"replica{i}_offset", 0)))
                          for i in range(topo.replicas)}
        self.diverged = False

    def snapshots(self, tag=tags.SNAP_REQ):
        self.last_snaps = request_snapshots(self.topo, tag)
        return self.last_snaps

    def checkpoint(self, snaps):
        to_c = self.layout.from_slices      # shards hold the partitioned layout, in order
        params = to_c([m["params"] for m in snaps])
        state = {k: to_c([m["state"][k] for m in snaps]) for k in snaps[0]["state"]}
        counters = {"updates": sum(m["version"] for m in snaps),
                    **{f"shard{m['shard']}_version": m["version"] for m in snaps}}
        for i, (st, ep, off) in self.positions.items():
            counters.update({f"replica{i}_step": st, f"replica{i}_epoch": ep,
                             f"replica{i}_offset": off})
        save_checkpoint(self.run.checkpoint, params, state, counters, self.cfg)
        return params

    def eval(self):
        self.client.fetch(self.theta)
        ev = self.evaluate(self.layout.to_canonical(self.theta))
        updates = sum(self.client.fetched_version.values())
        self.run.log("eval", updates=updates, test_loss=ev["loss"], test_accuracy=ev["accuracy"])
        return ev, updates

    def handle_messages(self):
        from mpi4py import MPI
        ctrl, st, any_msg = self.topo.ctrl, MPI.Status(), False
        while ctrl.Iprobe(source=MPI.ANY_SOURCE, status=st):
            any_msg = True
            src, tag = st.Get_source(), st.Get_tag()
            m = ctrl.recv(source=src, tag=tag)
            if tag == tags.LOG:
                self.positions[m["replica"]] = (m["step"], m.pop("epoch"), m.pop("offset"))
                self.run.log("train", **m)
            elif tag == tags.DONE:
                self.done[m["replica"]] = m
                self.positions[m["replica"]] = (m["steps"], m["epoch"], m["offset"])
            elif tag == tags.DIVERGED:
                self.diverged = True
            elif tag == tags.WARM:
                for reps in self.topo.replica_ranks[1:]:
                    ctrl.send(None, dest=reps[0], tag=tags.GO)
        return any_msg

    def loop(self):
        backoff = Backoff(hi=0.02)

        def step():
            """Serve the replicas' messages until there is nothing to do."""
            if self.handle_messages():
                backoff.busy()
            else:
                backoff.idle()
            if self.diverged:
                return DIVERGED
            return DONE if len(self.done) == self.topo.replicas else 0

        def evaluate():
            ev, updates = self.eval()
            self.say(f"{loop.elapsed():6.1f} s  updates {updates}  test accuracy "
                     f"{ev['accuracy']:.4f}  replicas done {len(self.done)}/"
                     f"{self.topo.replicas}")
            if not np.isfinite(ev["loss"]):
                self.diverged = True
            return ev

        loop = RunLoop(self.cfg["run"])
        stop = loop.run(step, evaluate, lambda: self.checkpoint(self.snapshots()))
        wall = loop.elapsed()
        ctrl = self.topo.ctrl
        for reps in self.topo.replica_ranks:
            for rank in reps:
                ctrl.send(None, dest=rank, tag=tags.STOP)
        while len(self.done) < self.topo.replicas:
            if not self.handle_messages():
                backoff.idle()
        snaps = self.snapshots(tags.DRAIN)   # every push the replicas sent is applied by now
        params = self.checkpoint(snaps)
        self.say(f"stopped ({stop}); checkpoint {self.run.checkpoint}", force=True)
        ev = self.evaluate(params)
        self.run.log("eval", updates=sum(m["version"] for m in snaps),
                     test_loss=ev["loss"], test_accuracy=ev["accuracy"])
        return self.summary(stop, wall, ev, snaps)

    def summary(self, stop, wall, ev, snaps):
        reps = [self.done[i] for i in range(self.topo.replicas)]
        # inbox pushes are timed by the shards, direct ones by the replicas
        stal = np.sum([m["staleness"] for m in snaps] + [d["staleness"] for d in reps], axis=0)
        last = int(np.flatnonzero(stal)[-1]) + 1 if stal.any() else 0
        samples = sum(d["samples"] for d in reps)
        o = self.cfg["optimizer"]
        return {
            "algorithm": "downpour", "ranks": self.topo.ctrl.Get_size(), "stop_reason": stop,
            "wall_time_s": wall, "samples_per_s": samples / wall if wall else 0.0,
            "final_test_loss": ev["loss"], "final_test_accuracy": ev["accuracy"],
            "num_params": self.net.num_params,
            "pushes_sent": sum(d["pushes_sent"] for d in reps),
            "pushes_applied": sum(m["applied"] for m in snaps),
            "pushes_rejected": (sum(m["rejected"] for m in snaps)
                                + sum(d["pushes_rejected"] for d in reps)),
            "push_attempts": sum(d["push_attempts"] for d in reps),
            "nonfinite_dropped": sum(d["nonfinite_dropped"] for d in reps),
            "updates": sum(m["version"] for m in snaps),
            "staleness_histogram": stal[:last].tolist(),
            "staleness_mean": float((stal * np.arange(len(stal))).sum() / max(stal.sum(), 1)),
            "partitions": self.topo.partitions,
            "partition_bytes_per_step": reps[0]["partition_bytes_per_step"],
            "partition_exchange_ms_per_step": reps[0]["partition_exchange_ms_per_step"],
            "replicas": [{"replica": d["replica"], "steps": d["steps"],
                          "samples_per_s": d["samples"] / d["wall_s"] if d["wall_s"] else 0.0,
                          "step_s": d["wall_s"] / max(d["steps"], 1),
                          "compute_s": d["compute_s"], "fetch_s": d["fetch_s"],
                          "push_s": d["push_s"], "fetches": d["fetches"],
                          "pushes_sent": d["pushes_sent"]} for d in reps],
            "shards": [{"shard": m["shard"], "applied": m["applied"],
                        "rejected": m["rejected"], "cpu_s": m["cpu_s"],
                        "attended_s": m["attended_s"],
                        "cpu_fraction": m["cpu_s"] / wall if wall else 0.0} for m in snaps],
            "config": {"replicas": self.topo.replicas, "ps_shards": self.topo.shards,
                       "n_fetch": o["n_fetch"], "n_push": o["n_push"],
                       "adagrad": o["adagrad"], "batch_size": o["batch_size"],
                       "pushes": "direct" if direct_pushes(self.cfg) else "inbox",
                       "attended_pairs": self.pairs["attended"]},
            "ps_pairs": self.pairs,
        }


def run_downpour(topo, cfg, net, out, resume=None, quiet=False):
    """Every rank calls this; each plays its role.  Returns the summary on the coordinator."""
    ps = PSSetup(topo, net, cfg["optimizer"]["learning_rate"] if direct_pushes(cfg) else None,
                 cfg["cluster"]["ps_progress"])
    server = make_shard(topo, cfg, net, ps, resume) if topo.role == "shard" else None
    ps.start(topo)                 # every shard's memory is initialised before anyone uses it
    if server is not None:
        serve_shard(topo, server)
    summary = None
    if topo.role == "replica":
        _run_replica(topo, cfg, net, ps.client, resume)
    elif topo.role == "coordinator":
        run = RunDir(out, cfg, append=resume is not None)
        try:
            co = _Coordinator(topo, cfg, net, ps, run, quiet, resume)
            summary = co.loop()
            run.write_summary(summary)
        finally:
            run.close()
        for rank in topo.shard_ranks + [x for reps in topo.replica_ranks for x in reps]:
            topo.ctrl.send(None, dest=rank, tag=tags.FINISH)
    ps.free()
    return summary
